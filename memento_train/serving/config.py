"""The plugin's options: engine defaults in vLLM's ``additional_config``, overrides per request.

An engine is started with ``additional_config={"memento": ServingConfig(...).to_dict()}``: the
special-token ids (the tokenizer's; the tracker reacts to them), the default eviction options
(:class:`~memento_train.generation.engine.BlockMaskingConfig`, the serving overlay's names) and
whether finished requests report full per-token traces. A request may override the eviction options
with ``SamplingParams(extra_args={"memento": {"keep_last_n_blocks": 1, ...}})`` (OpenAI server:
``"vllm_xargs": {"memento": ...}`` is not nested-capable, so the server accepts the flat keys
``memento_keep_last_n_blocks`` etc. as well). One engine therefore serves several eviction configs,
which is how the tests compare them against the reference engine with a single engine start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from memento_train.generation.engine import BlockMaskingConfig
from memento_train.masking import SpecialTokens

CONFIG_KEY = "memento"  # in additional_config and in SamplingParams.extra_args
FLAT_PREFIX = "memento_"  # flat per-request keys (OpenAI vllm_xargs only carries scalars)
# Diagnostic, per request: track and report evictions but keep the KV (no compaction). What a server
# that only does the bookkeeping computes; the tests' negative control. Never for real use.
KEEP_KV_KEY = "memento_debug_keep_kv"
_MASKING_KEYS = tuple(f.name for f in fields(BlockMaskingConfig))


@dataclass(frozen=True)
class ServingConfig:
    """Engine-wide options of the Memento plugin.

    Attributes:
        special: the tracker's token ids (:class:`~memento_train.masking.SpecialTokens` fields).
        block_masking: default eviction options for requests that do not override them.
        report_traces: finished requests report per-token lists (physical KV per step, forced
            tokens, eviction events); otherwise only the summary numbers (evicted tokens, peak KV).
    """

    special: SpecialTokens
    block_masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    report_traces: bool = True

    def __post_init__(self) -> None:
        if not self.block_masking.compact_on_summary_end:
            raise ValueError(
                "block_masking.compact_on_summary_end=false is not supported by the vLLM plugin: the "
                "served model would keep blocks the training mask drops (set it to true)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "special": asdict(self.special),
            "block_masking": self.block_masking.to_dict(),
            "report_traces": self.report_traces,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ServingConfig:
        unknown = set(raw) - {"special", "block_masking", "report_traces"}
        if unknown:
            raise ValueError(f"additional_config['{CONFIG_KEY}'] has unknown keys {sorted(unknown)}")
        if "special" not in raw:
            raise ValueError(f"additional_config['{CONFIG_KEY}'] lacks 'special' (the memento token ids)")
        return cls(
            special=SpecialTokens(**raw["special"]),
            block_masking=masking_from_dict(raw.get("block_masking", {})),
            report_traces=bool(raw.get("report_traces", True)),
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> ServingConfig:
        """Read it back inside the engine (scheduler, worker, logits processor)."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        if CONFIG_KEY not in extra:
            raise ValueError(
                f"the Memento vLLM plugin needs additional_config={{'{CONFIG_KEY}': ...}}; build the engine "
                "arguments with memento_train.serving.plugin_engine_args (or run memento-serve)"
            )
        return cls.from_dict(extra[CONFIG_KEY])

    def request_masking(self, extra_args: Mapping[str, Any] | None) -> BlockMaskingConfig:
        """This request's eviction options: the engine default updated by its ``extra_args``."""
        override = request_override(extra_args)
        if not override:
            return self.block_masking
        cfg = masking_from_dict({**self.block_masking.to_dict(), **override})
        if not cfg.compact_on_summary_end:
            raise ValueError("memento compact_on_summary_end=false is not supported by the vLLM plugin")
        return cfg


def request_keeps_kv(extra_args: Mapping[str, Any] | None) -> bool:
    """The diagnostic :data:`KEEP_KV_KEY`: evictions are tracked and reported but not applied."""
    return bool(extra_args and extra_args.get(KEEP_KV_KEY))


def validate_request_override(extra_args: Mapping[str, Any] | None) -> None:
    """Check a request's eviction options before it reaches the engine (whatever the engine defaults).

    A request that sets ``keep_last_block_for_answer`` must also set ``keep_last_n_blocks``: the two
    are only valid together (0), and the engine default must not decide whether a request is valid.
    """
    override = request_override(extra_args)
    if not override:
        return
    if override.get("keep_last_block_for_answer") and "keep_last_n_blocks" not in override:
        raise ValueError("memento keep_last_block_for_answer=true needs keep_last_n_blocks=0 in the same request")
    cfg = masking_from_dict({**BlockMaskingConfig().to_dict(), **override})
    if not cfg.compact_on_summary_end:
        raise ValueError("memento compact_on_summary_end=false is not supported by the vLLM plugin")


def masking_from_dict(raw: Mapping[str, Any]) -> BlockMaskingConfig:
    """A :class:`BlockMaskingConfig` from a plain dict; unknown keys are an error naming them."""
    unknown = set(raw) - set(_MASKING_KEYS)
    if unknown:
        raise ValueError(f"unknown memento eviction options {sorted(unknown)}; known: {list(_MASKING_KEYS)}")
    values = dict(raw)
    if values.get("max_block_tokens") == 0:
        values["max_block_tokens"] = None  # the overlay's "0 = no cap"
    return BlockMaskingConfig(**values)


def request_override(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The eviction options a request sets: ``extra_args["memento"]`` and flat ``memento_<name>`` keys."""
    if not extra_args:
        return {}
    nested = extra_args.get(CONFIG_KEY) or {}
    if not isinstance(nested, Mapping):
        raise ValueError(f"extra_args['{CONFIG_KEY}'] must be a mapping of eviction options")
    flat = {k[len(FLAT_PREFIX) :]: v for k, v in extra_args.items() if k.startswith(FLAT_PREFIX) and k != KEEP_KV_KEY}
    out = {**flat, **nested}
    unknown = set(out) - set(_MASKING_KEYS)
    if unknown:
        raise ValueError(f"unknown memento eviction options {sorted(unknown)}; known: {list(_MASKING_KEYS)}")
    return out
