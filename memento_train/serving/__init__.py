"""Memento block eviction as a plugin for vLLM 0.32 (no vLLM file replaced).

The eviction decisions come from :class:`memento_train.masking.BlockTracker`, the state machine that
builds the training masks, so serving and training apply one rule by construction:

- :mod:`.config` — :class:`ServingConfig` (``additional_config["memento"]``) and per-request overrides;
- :mod:`.request_state` — per-request tracker, due evictions, logical → physical positions;
- :mod:`.scheduler` — :class:`~.scheduler.MementoScheduler`: applies evictions, frees blocks, cuts
  chunks at eviction rows, replays them after preemption, reports per request;
- :mod:`.kv_compaction` — slot moves in the paged cache, layout probed through the backend;
- :mod:`.model_runner` / :mod:`.worker` — compaction, physical ``seq_lens``/slot mapping with logical
  RoPE positions, exact log-probs, the per-step report;
- :mod:`.block_cap` — the block-length cap (``max_block_tokens``) as a logits processor;
- :mod:`.engine_args` — :func:`plugin_engine_args`, the engine keywords that install all of it;
- :mod:`.cli` — ``memento-serve MODEL`` (the OpenAI-compatible server with the plugin).

Only :mod:`.config` and :mod:`.engine_args` import without vLLM.
"""

from memento_train.serving.config import CONFIG_KEY, ServingConfig
from memento_train.serving.engine_args import (
    SUPPORTED_VLLM,
    check_vllm_plugin,
    plugin_engine_args,
    plugin_supported,
    vllm_version,
)

__all__ = [
    "CONFIG_KEY",
    "SUPPORTED_VLLM",
    "ServingConfig",
    "check_vllm_plugin",
    "plugin_engine_args",
    "plugin_supported",
    "vllm_version",
]
