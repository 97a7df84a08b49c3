"""Configuration of ``memento-eval``: one :class:`EvalConfig`, built like every config of the project.

``memento-eval [show] [recipe=NAME|PATH] [key=value ...]`` follows the rules of ``memento-train`` and
``memento-rl`` (:mod:`memento_train.config.tree`, :func:`memento_train.recipes.cli.run_recipe_cli`):
the recipe (default :data:`DEFAULT_RECIPE`, the shipped ``tiny_eval``: the ``math_small`` problems, the
``tiny`` random model, the reference generator, n=4, 96 new tokens, a CPU plumbing check), then the
overrides, dotted for nested options (``sampling.temperature=0.6``,
``block_masking.keep_last_n_blocks=0``, ``generator_kwargs.gpu_memory_utilization=0.85``).

What a recipe gives memento-eval:

- an *eval recipe* (a shipped name such as ``tiny_eval`` or a ``.yaml``/``.json`` file, ``defaults:``
  inheritance included): its ``eval:`` section, or the whole file when it has none; a top-level
  ``block_masking:`` section is used when the ``eval:`` section has none, so one file's eviction
  options serve training, rollout and evaluation;
- a *training recipe* (``memento-train``/``memento-rl``: it has ``stage``, ``data``, ``rollout``...):
  memento-eval evaluates what it trains, the export ``<its output_dir>/hf`` (``model=``), with its
  system prompt; the eviction rule comes from the export's ``memento_train.json``. The rest starts
  from ``tiny_eval``.

Everything is validated before any model is loaded; errors are :class:`ConfigError` naming the option.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from memento_train.config.errors import ConfigError
from memento_train.config.tree import (
    build,
    canonical_tree,
    check_types,
    deep_merge,
    parse_overrides,
    renamed_from,
)
from memento_train.evaluation.scoring import TruncatedPolicy
from memento_train.generation.engine import SamplingParams
from memento_train.masking import BlockMaskingConfig
from memento_train.recipes import load_recipe

Generator = Literal["reference", "vllm"]
GENERATORS = get_args(Generator)
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N, so device is a str checked in validate()
BUILTIN_PREFIX = "builtin:"
BUILTIN_PROBLEM_SETS = ("math_small",)
TINY_MODEL = "tiny"
DEFAULT_RECIPE = "tiny_eval"
# A recipe with one of these top-level keys is a memento-train / memento-rl recipe, not an eval recipe.
TRAINING_SECTIONS = ("stage", "data", "rollout", "prompts", "algorithm", "train")
# max_new_tokens when sampling.max_new_tokens is left at None ("auto").
AUTO_MAX_NEW_TOKENS = {"tiny": 96, "checkpoint": 32768}
# The sampling parameters SamplingParams checks (the generators' own contract) map to these options.
_SAMPLING_OPTION = {
    "max_new_tokens": "sampling.max_new_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "min_p": "sampling.min_p",
    "n": "n",
}


def __getattr__(name: str) -> Any:
    if name == "EvalConfigError":  # memento-eval's errors are ConfigErrors, like every other CLI's
        warnings.warn(
            "EvalConfigError is deprecated; catch memento_train.config.errors.ConfigError",
            DeprecationWarning,
            stacklevel=2,
        )
        return ConfigError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def builtin_problem_path(name: str) -> Path:
    """Path of a problem set shipped in ``memento_train/assets/eval/`` (``math_small``)."""
    if name not in BUILTIN_PROBLEM_SETS:
        raise ConfigError(
            f"problems: unknown built-in problem set {name!r}; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_PROBLEM_SETS)
        )
    return Path(__file__).resolve().parent.parent / "assets" / "eval" / f"{name}.jsonl"


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling of every response (vLLM semantics; ``top_k=0``/``min_p=0`` disable those filters).

    ``temperature=0.6, top_p=0.95`` are the paper's evaluation settings. ``max_new_tokens=None`` means
    auto: 96 for the tiny model, 32768 for a real checkpoint.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Everything one ``memento-eval`` run needs.

    Attributes:
        problems: problem set: ``builtin:math_small`` (shipped), a local ``.jsonl``/``.json``/``.parquet``
            file or directory, or a Hugging Face hub dataset name (needs network).
        split: split to read (local files are exposed under this split name too).
        problems_config: hub dataset config name (``datasets.load_dataset(name, problems_config)``).
        problem_field / answer_field / id_field: column names; ids default to ``row{index}`` when the
            id column is absent.
        limit: evaluate only the first ``limit`` problems (``None`` = all).
        model: ``tiny`` (the embedded default: a seeded random 2-layer Qwen3 built from a config with the
            shipped tokenizer and the memento tokens; its accuracy is ~0 and it almost never emits memento
            tokens, so blocks per response is ~0 — it checks the plumbing, not the method), or a local HF
            checkpoint directory / hub name for ``AutoModelForCausalLM.from_pretrained``.
        tokenizer: tokenizer directory / hub name; ``None`` = the model's (the shipped one for ``tiny``).
        generator: ``reference`` (:class:`memento_train.generation.reference.ReferenceGenerator`, physical
            KV eviction, any device) or ``vllm`` (:class:`memento_train.generation.vllm_engine.VLLMEngine`:
            vLLM 0.32 with the Memento plugin, CPU or GPU; or vLLM 0.13 with the overlay). ``engine`` is
            the deprecated old name of this key.
        generator_kwargs: extra keyword arguments for the generator's constructor (e.g. vLLM's
            ``gpu_memory_utilization``, ``kv_cache_memory_bytes``, ``enforce_eager``, ``max_model_len``).
            ``engine_kwargs`` is its deprecated old name.
        n: samples per problem.
        k: the k of pass@k and maj@k (each <= n); ``None`` = 1, 2, 4, ... up to n, and n.
        sampling: :class:`SamplingOptions`.
        block_masking: the eviction options (:class:`~memento_train.masking.BlockMaskingConfig`, the serving
            overlay's names, the same class as ``data.block_masking`` and ``rollout.block_masking``). For a
            model exported by memento-train the options of the rule itself (``keep_last_n_blocks``,
            ``mask_delimiters``, ``keep_last_block_for_answer``) that are not given default to the ones it was
            trained with (its ``memento_train.json``), and given ones must agree with them.
        allow_mask_mismatch: evaluate with ``block_masking`` options that contradict the model's
            training rule (e.g. ``block_masking.enable=false`` on a stage-2 model, on purpose).
        system_prompt: optional system message (none by default, as for Qwen3).
        require_think_end / truncated: the grading rule
            (:class:`~memento_train.evaluation.scoring.GradingRule`, the same options as RL's
            ``reward.*``): by default a response without ``</think>`` or one that hit
            ``max_new_tokens`` is wrong (``require_think_end=false``, ``truncated=score`` grade them).
        output_dir: where ``generations.jsonl``, ``summary.json``, ``summary.md`` and
            ``kv_sawtooth.png`` go (required).
        seed: seeds the tiny model's weights and sampling (batch ``b`` samples with ``seed + b``).
        batch_size: prompts per engine call (each yields ``n`` responses; the reference engine decodes
            at most its ``max_batch_size`` sequences at once, set with ``generator_kwargs.max_batch_size``).
        dtype / device: model weights' dtype and device (``auto``: float32 on CPU, bfloat16 on CUDA).
        kv_geometry: what the KV figures in GB are computed for: ``auto`` = the evaluated model's own
            config, or a built-in name from :data:`memento_train.data.stats.KV_GEOMETRY` (e.g.
            ``qwen3-8b``), or a path to a ``config.json``.
        kv_dtype_bytes: bytes per KV element for the GB figures (2 = bf16/fp16 serving).
        plot_samples: how many responses the KV sawtooth plot shows (0 = no plot).
        progress: show a tqdm progress bar.
    """

    problems: str = BUILTIN_PREFIX + "math_small"
    split: str = "train"
    problems_config: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str = "id"
    limit: int | None = None
    model: str = TINY_MODEL
    tokenizer: str | None = None
    generator: Generator = field(default="reference", metadata=renamed_from("engine"))
    generator_kwargs: dict = field(default_factory=dict, metadata=renamed_from("engine_kwargs"))
    n: int = 4
    k: list[int] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    block_masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    allow_mask_mismatch: bool = False
    system_prompt: str | None = None
    require_think_end: bool = True
    truncated: TruncatedPolicy = "zero"
    output_dir: str | None = None
    seed: int = 0
    batch_size: int = 32
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    device: str = "auto"
    kv_geometry: str = "auto"
    kv_dtype_bytes: int = 2
    plot_samples: int = 4
    progress: bool = True
    # The block_masking options given explicitly (by a recipe or the command line), so the model's own
    # rule fills only the others (with_model_mask). Not an option (the builder skips "_" names).
    _mask_keys: frozenset = field(default=frozenset(), repr=False, compare=False)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_MODEL

    @property
    def ks(self) -> list[int]:
        """The k values actually reported (sorted, unique, each <= n)."""
        if self.k is not None:
            return sorted(set(self.k))
        out, k = [], 1
        while k <= self.n:
            out.append(k)
            k *= 2
        if out[-1] != self.n:
            out.append(self.n)
        return out

    @property
    def max_new_tokens(self) -> int:
        if self.sampling.max_new_tokens is not None:
            return self.sampling.max_new_tokens
        return AUTO_MAX_NEW_TOKENS["tiny" if self.is_tiny else "checkpoint"]

    def problems_path(self) -> str:
        """The problem source with ``builtin:`` names resolved to the shipped file."""
        if self.problems.startswith(BUILTIN_PREFIX):
            return str(builtin_problem_path(self.problems[len(BUILTIN_PREFIX) :]))
        return self.problems

    @property
    def grading_rule(self):
        """The :class:`~memento_train.evaluation.scoring.GradingRule` of ``require_think_end`` / ``truncated``."""
        from memento_train.evaluation.scoring import GradingRule

        return GradingRule(require_think_end=self.require_think_end, truncated=self.truncated)

    def sampling_params(self, *, stop_token_ids: tuple[int, ...] = (), seed: int | None = None) -> SamplingParams:
        s = self.sampling
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            n=self.n,
            seed=self.seed if seed is None else seed,
            stop_token_ids=tuple(stop_token_ids),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_mask_keys")
        return out

    # -- validation ------------------------------------------------------------------------------
    def validate(self, *, require_output_dir: bool = True) -> EvalConfig:
        """Check values that types alone do not catch; raise :class:`ConfigError` naming the option.

        ``require_output_dir=False`` is for ``memento-eval show``, which writes nothing."""

        def bad(option: str, msg: str) -> None:
            raise ConfigError(f"{option} {msg}")

        check_types(self)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            bad("device", f"must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        if self.n < 1:
            bad("n", f"must be >= 1, got {self.n}")
        if self.k is not None:
            if not self.k:
                bad("k", "must list at least one k (or be null for 1, 2, 4, ..., n)")
            for k in self.k:
                if not 1 <= k <= self.n:
                    bad("k", f"must be in [1, n={self.n}], got {k}; raise n or drop that k")
        if self.limit is not None and self.limit < 1:
            bad("limit", f"must be >= 1 or null for all problems, got {self.limit}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.kv_dtype_bytes not in (1, 2, 4, 8):
            bad("kv_dtype_bytes", f"must be 1, 2, 4 or 8, got {self.kv_dtype_bytes}")
        if self.plot_samples < 0:
            bad("plot_samples", f"must be >= 0, got {self.plot_samples}")
        if require_output_dir and not self.output_dir:
            bad("output_dir", "is required: pass output_dir=PATH (the report, generations and plot go there)")
        if not self.problems:
            bad("problems", "must name a problem set")
        if self.problems.startswith(BUILTIN_PREFIX):
            builtin_problem_path(self.problems[len(BUILTIN_PREFIX) :])
        elif _looks_local(self.problems) and not os.path.exists(os.path.expanduser(self.problems)):
            bad(
                "problems",
                f"{self.problems!r} does not exist (a .jsonl/.json/.parquet file or directory, "
                "builtin:math_small, or a hub dataset name such as 'org/name')",
            )
        if not self.is_tiny and _looks_local(self.model) and not os.path.isdir(os.path.expanduser(self.model)):
            bad("model", f"{self.model!r} is not a checkpoint directory (or pass model=tiny)")
        if self.generator == "vllm" and self.is_tiny:
            bad(
                "generator",
                "vllm needs a real checkpoint directory in model=...; the tiny model runs with generator=reference",
            )
        for name in ("problem_field", "answer_field", "id_field"):
            if not getattr(self, name):
                bad(name, "must be a non-empty column name")
        from memento_train.data.stats import KV_GEOMETRY

        g = self.kv_geometry
        if g != "auto" and g not in KV_GEOMETRY and not os.path.exists(os.path.expanduser(g)):
            bad("kv_geometry", f"must be 'auto', one of {', '.join(KV_GEOMETRY)}, or a config.json path, got {g!r}")
        try:
            self.sampling_params()
        except ValueError as exc:
            problems = str(exc).replace("invalid sampling params: ", "").split("; ")
            raise ConfigError("; ".join(_name_sampling_option(p) for p in problems)) from exc
        return self


def _name_sampling_option(problem: str) -> str:
    """``top_p must be in (0, 1] ...`` -> ``sampling.top_p must be in (0, 1] ...``."""
    name = problem.split(" ", 1)[0]
    return f"{_SAMPLING_OPTION[name]}{problem[len(name) :]}" if name in _SAMPLING_OPTION else problem


def _looks_local(text: str) -> bool:
    p = Path(text)
    return (
        text.startswith(("/", "./", "../", "~"))
        or p.suffix.lower() in (".jsonl", ".json", ".parquet")
        or text.count("/") > 1
    )


# -- building ----------------------------------------------------------------------------------------
def from_dict(values: Mapping[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from a nested mapping (a recipe's ``eval:`` section merged with overrides),
    built with the rules of every config; not validated (:meth:`EvalConfig.validate`)."""
    values = canonical_tree(EvalConfig, values)
    cfg = build(EvalConfig, values)
    given = values.get("block_masking")
    return replace(cfg, _mask_keys=frozenset(given) if isinstance(given, Mapping) else frozenset())


def recipe_tree(name: str, tree: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options recipe ``name`` (its loaded ``tree``, if at hand) gives ``memento-eval`` (see the
    module docstring)."""
    tree = load_recipe(name) if tree is None else tree
    if is_training_recipe(tree):
        return deep_merge(load_recipe(DEFAULT_RECIPE), _training_recipe_options(name, tree))
    section = tree
    if "eval" in tree:
        section = tree["eval"] or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"recipe {name!r}: its eval: section must be a mapping of memento-eval options")
        if "block_masking" not in section and isinstance(tree.get("block_masking"), Mapping):
            section = {**section, "block_masking": tree["block_masking"]}
    return canonical_tree(EvalConfig, section)


def is_training_recipe(tree: Mapping[str, Any]) -> bool:
    """Whether a recipe tree is for ``memento-train`` / ``memento-rl`` rather than ``memento-eval``."""
    return any(key in tree for key in TRAINING_SECTIONS)


def _training_recipe_options(name: str, tree: Mapping[str, Any]) -> dict[str, Any]:
    """memento-eval options for the model a training recipe produces: its export and system prompt."""
    out = tree.get("output_dir")
    if not out:
        raise ConfigError(
            f"recipe={name} is a training recipe without an output_dir, so its export is unknown; "
            "pass model=DIR (a checkpoint directory)"
        )
    values: dict[str, Any] = {"model": str(Path(os.path.abspath(os.path.expanduser(str(out)))) / "hf")}
    for section in ("data", "prompts"):
        prompt = (tree.get(section) or {}).get("system_prompt")
        if prompt:
            values["system_prompt"] = prompt
    return values


def load_eval_config(
    recipe: str | None, overrides: Sequence[str] | Mapping[str, Any] = (), *, require_output_dir: bool = True
) -> EvalConfig:
    """``recipe`` (default ``tiny_eval``) + ``key=value`` overrides -> a validated :class:`EvalConfig`,
    its block masking completed from the model's export (:func:`with_model_mask`)."""
    name = recipe or DEFAULT_RECIPE
    tree = load_recipe(name)
    top = canonical_tree(EvalConfig, overrides if isinstance(overrides, Mapping) else parse_overrides(overrides))
    cfg = from_dict(deep_merge(recipe_tree(name, tree), top))
    if is_training_recipe(tree) and "model" not in top and not os.path.isdir(cfg.model):
        cli = "memento-rl" if "rollout" in tree else "memento-train"
        raise ConfigError(
            f"recipe={name}: memento-eval evaluates that recipe's export {cfg.model}, which does not "
            f"exist yet; run `{cli} recipe={name}` first, or pass model=DIR"
        )
    return with_model_mask(cfg).validate(require_output_dir=require_output_dir)


def build_config(argv: Sequence[str] | None = None) -> EvalConfig:
    """``[recipe=NAME|PATH] [key=value ...]`` -> a validated :class:`EvalConfig` (what the CLI runs)."""
    from memento_train.recipes import split_recipe_arg

    recipe, rest = split_recipe_arg(list(argv or []))
    return load_eval_config(recipe, rest)


def with_model_mask(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` with the block-masking rule options it does not set taken from the model's export
    (``memento_train.json``); :class:`ConfigError` when a set one contradicts the model's rule,
    unless ``allow_mask_mismatch``. A model without that file (a hub name, ``tiny``) is left alone."""
    from memento_train.export.writer import apply_exported_mask, exported_mask

    trained = None if cfg.is_tiny else exported_mask(cfg.model)
    if trained is None:
        return cfg
    masking, mismatches = apply_exported_mask(cfg.block_masking, trained, cfg._mask_keys)
    if mismatches and not cfg.allow_mask_mismatch:
        raise ConfigError(
            f"block_masking: {', '.join(mismatches)}: model={cfg.model!r} was trained with another eviction rule "
            f"(its memento_train.json), so it would be evaluated under a mask it never saw; drop the option to use "
            f"the model's, or set allow_mask_mismatch=true"
        )
    return replace(cfg, block_masking=masking)


__all__ = [
    "BUILTIN_PREFIX",
    "DEFAULT_RECIPE",
    "EvalConfig",
    "GENERATORS",
    "SamplingOptions",
    "build_config",
    "builtin_problem_path",
    "from_dict",
    "is_training_recipe",
    "load_eval_config",
    "recipe_tree",
    "with_model_mask",
]
