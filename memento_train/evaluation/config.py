"""Configuration of ``memento-eval``: one :class:`EvalConfig`, from defaults < recipe < ``key=value``.

Sources, later ones win:

1. the dataclass defaults below (the *embedded default*: the shipped ``math_small`` problem set, the
   ``tiny`` random model, the reference generator, n=4, 96 new tokens — a CPU plumbing check);
2. ``recipe=PATH`` (YAML with PyYAML installed, or JSON): its ``eval:`` section, or the whole file when it
   has none. A top-level ``block_masking:`` section is inherited when the ``eval:`` section has none,
   so one recipe's eviction options serve training, rollout and evaluation;
3. command-line overrides ``key=value``, Hydra-style; nested options with dots
   (``sampling.temperature=0.6``, ``block_masking.keep_last_n_blocks=0``,
   ``engine_kwargs.gpu_memory_utilization=0.85``).

Values on the command line are parsed as YAML scalars/lists when PyYAML is importable (else as JSON,
falling back to the raw string), then coerced to the option's type: ``k=1,2,4``, ``k=[1,2,4]`` and
``k=4`` all work; ``none``/``null`` clears an optional option. String options keep the raw text
(``system_prompt=yes`` is the string ``"yes"``).

Everything is validated before any model is loaded: an unknown key raises :class:`EvalConfigError`
listing the valid keys; a bad value raises naming the option.
"""

from __future__ import annotations

import json
import os
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

from memento_train.generation.engine import BlockMaskingConfig, SamplingParams

GENERATORS = ("reference", "vllm")
ENGINES = GENERATORS  # the old name
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu", "cuda")
BUILTIN_PREFIX = "builtin:"
BUILTIN_PROBLEM_SETS = ("math_small",)
TINY_MODEL = "tiny"
# max_new_tokens when sampling.max_new_tokens is left at None ("auto").
AUTO_MAX_NEW_TOKENS = {"tiny": 96, "checkpoint": 32768}


class EvalConfigError(ValueError):
    """An ``memento-eval`` option is unknown or has an unusable value; the message names it."""


def builtin_problem_path(name: str) -> Path:
    """Path of a problem set shipped in ``memento_train/assets/eval/`` (``math_small``)."""
    if name not in BUILTIN_PROBLEM_SETS:
        raise EvalConfigError(
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
        engine_kwargs: extra keyword arguments for the generator's constructor (e.g. vLLM's
            ``gpu_memory_utilization``, ``kv_cache_memory_bytes``, ``enforce_eager``, ``max_model_len``).
        n: samples per problem.
        k: the k of pass@k and maj@k (each <= n); ``None`` = 1, 2, 4, ... up to n, and n.
        sampling: :class:`SamplingOptions`.
        block_masking: the serving overlay's eviction options
            (:class:`~memento_train.generation.engine.BlockMaskingConfig` field names). For a model
            exported by memento-train the options of the rule itself (``keep_last_n_blocks``,
            ``mask_delimiters``, ``keep_last_block_for_answer``) that are not given default to the ones
            it was trained with (its ``memento_train.json``), and given ones must agree with them.
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
            at most its ``max_batch_size`` sequences at once, set with ``engine_kwargs.max_batch_size``).
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
    generator: str = "reference"
    engine_kwargs: dict = field(default_factory=dict)
    n: int = 4
    k: list[int] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    block_masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig)
    allow_mask_mismatch: bool = False
    system_prompt: str | None = None
    require_think_end: bool = True
    truncated: str = "zero"
    output_dir: str | None = None
    seed: int = 0
    batch_size: int = 32
    dtype: str = "auto"
    device: str = "auto"
    kv_geometry: str = "auto"
    kv_dtype_bytes: int = 2
    plot_samples: int = 4
    progress: bool = True
    # The block_masking options given explicitly (by a recipe or the command line), so the model's own
    # rule fills only the others (with_model_mask). Not an option.
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
            return str(builtin_problem_path(self.problems[len(BUILTIN_PREFIX):]))
        return self.problems

    @property
    def grading_rule(self):
        """The :class:`~memento_train.evaluation.scoring.GradingRule` of ``require_think_end`` / ``truncated``."""
        from .scoring import GradingRule

        return GradingRule(require_think_end=self.require_think_end, truncated=self.truncated)

    def sampling_params(self, *, stop_token_ids: tuple[int, ...] = (), seed: int | None = None) -> SamplingParams:
        s = self.sampling
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            min_p=s.min_p, n=self.n, seed=self.seed if seed is None else seed, stop_token_ids=tuple(stop_token_ids),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_mask_keys")
        return out

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> EvalConfig:
        """Check values that types alone do not catch; raise :class:`EvalConfigError` naming the option."""
        def bad(option: str, msg: str) -> None:
            raise EvalConfigError(f"{option}: {msg}")

        if self.generator not in GENERATORS:
            bad("generator", f"must be one of {', '.join(GENERATORS)} (got {self.generator!r})")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            bad("device", f"must be one of {', '.join(DEVICES)} or cuda:N (got {self.device!r})")
        if self.n < 1:
            bad("n", f"must be >= 1 (got {self.n})")
        if self.k is not None:
            if not self.k:
                bad("k", "must list at least one k (or be null for 1, 2, 4, ..., n)")
            for k in self.k:
                if not 1 <= k <= self.n:
                    bad("k", f"every k must be in [1, n={self.n}] (got {k}); raise n or drop that k")
        if self.limit is not None and self.limit < 1:
            bad("limit", f"must be >= 1 or null for all problems (got {self.limit})")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1 (got {self.batch_size})")
        if self.kv_dtype_bytes not in (1, 2, 4, 8):
            bad("kv_dtype_bytes", f"must be 1, 2, 4 or 8 (got {self.kv_dtype_bytes})")
        if self.plot_samples < 0:
            bad("plot_samples", f"must be >= 0 (got {self.plot_samples})")
        if not self.output_dir:
            bad("output_dir", "is required: pass output_dir=PATH (the report, generations and plot go there)")
        if not self.problems:
            bad("problems", "must name a problem set")
        if self.problems.startswith(BUILTIN_PREFIX):
            builtin_problem_path(self.problems[len(BUILTIN_PREFIX):])
        elif _looks_local(self.problems) and not os.path.exists(os.path.expanduser(self.problems)):
            bad("problems", f"{self.problems!r} does not exist (a .jsonl/.json/.parquet file or directory, "
                "builtin:math_small, or a hub dataset name such as 'org/name')")
        if not self.is_tiny and _looks_local(self.model) and not os.path.isdir(os.path.expanduser(self.model)):
            bad("model", f"{self.model!r} is not a checkpoint directory (or pass model=tiny)")
        if self.generator == "vllm" and self.is_tiny:
            bad("generator", "vllm needs a real checkpoint directory in model=...; the tiny model runs with "
                "generator=reference")
        for name in ("problem_field", "answer_field", "id_field"):
            if not getattr(self, name):
                bad(name, "must be a non-empty column name")
        from .scoring import TRUNCATED_POLICIES

        if self.truncated not in TRUNCATED_POLICIES:
            bad("truncated", f"must be one of {', '.join(TRUNCATED_POLICIES)} (got {self.truncated!r})")
        from memento_train.data.stats import KV_GEOMETRY

        g = self.kv_geometry
        if g != "auto" and g not in KV_GEOMETRY and not os.path.exists(os.path.expanduser(g)):
            bad("kv_geometry", f"must be 'auto', one of {', '.join(KV_GEOMETRY)}, or a config.json path (got {g!r})")
        try:
            self.sampling_params()
        except ValueError as exc:
            bad("sampling", str(exc).replace("invalid sampling params: ", ""))
        return self


def _looks_local(text: str) -> bool:
    p = Path(text)
    return (
        text.startswith(("/", "./", "../", "~"))
        or p.suffix.lower() in (".jsonl", ".json", ".parquet")
        or text.count("/") > 1
    )


# -- building from mappings and overrides ------------------------------------------------------------
_NESTED = {"sampling": SamplingOptions, "block_masking": BlockMaskingConfig}
_FREE_FORM = {"engine_kwargs"}


def valid_keys() -> list[str]:
    """Every key ``memento-eval`` accepts (nested ones dotted)."""
    out = []
    for f in fields(EvalConfig):
        if f.name.startswith("_"):
            continue
        if f.name in _NESTED:
            out.extend(f"{f.name}.{g.name}" for g in fields(_NESTED[f.name]))
        elif f.name in _FREE_FORM:
            out.append(f"{f.name}.<name>")
        else:
            out.append(f.name)
    return out


def _type_hints(cls) -> dict[str, Any]:
    import memento_train.generation.engine as engine_mod

    return typing.get_type_hints(cls, globalns={**vars(engine_mod), **globals()})


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML (or JSON) would read it; the raw string when that fails."""
    try:
        import yaml

        return yaml.safe_load(text) if text.strip() else text
    except ImportError:
        pass
    except Exception:
        return text
    try:
        return json.loads(text)
    except ValueError:
        low = text.strip().lower()
        return {"true": True, "false": False, "null": None, "none": None}.get(low, text)


def _coerce(option: str, value: Any, tp: Any, raw: str | None) -> Any:
    """``value`` converted to type ``tp``; raises EvalConfigError naming ``option``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            raise EvalConfigError(f"{option}: may not be null")
        return _coerce(option, value, non_none[0], raw)
    if tp is str:
        if raw is not None:
            return raw  # keep the literal command-line text
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise EvalConfigError(f"{option}: expected a string, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise EvalConfigError(f"{option}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise EvalConfigError(f"{option}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise EvalConfigError(f"{option}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise EvalConfigError(f"{option}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise EvalConfigError(f"{option}: expected a number, got {value!r}")
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            parts = [p for p in value.strip().strip("[]").split(",") if p.strip()]
            return [_coerce(option, p.strip(), item, None) for p in parts]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_coerce(option, v, item, None) for v in value]
        raise EvalConfigError(f"{option}: expected a list such as 1,2,4, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise EvalConfigError(f"{option}: expected a mapping, got {value!r}")
    return value


def _unknown(keys: list[str]) -> EvalConfigError:
    return EvalConfigError(
        f"unknown option(s) {', '.join(sorted(keys))}; valid keys: {', '.join(valid_keys())}"
    )


def from_dict(values: dict[str, Any], base: EvalConfig | None = None, *, _raw: dict[str, str] | None = None) -> EvalConfig:
    """``base`` (default: the defaults) updated with a nested mapping, e.g. a recipe's ``eval:`` section.

    Nested sections may be given as mappings (``{"sampling": {"temperature": 0.6}}``) or dotted keys
    (``{"sampling.temperature": 0.6}``). Does not run :meth:`EvalConfig.validate`.
    """
    base = base or EvalConfig()
    raw = _raw or {}
    hints = _type_hints(EvalConfig)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in (*_NESTED, *_FREE_FORM)}
    unknown: list[str] = []
    for key, value in (values or {}).items():
        key = str(key)
        if key == "engine":  # the old name of `generator`
            warnings.warn("memento-eval: `engine` is deprecated; use `generator`", DeprecationWarning, stacklevel=2)
            raw = {**raw, "generator": raw.get("engine", value)} if "engine" in raw else raw
            key = "generator"
        head, _, rest = key.partition(".")
        if head in nested:
            if rest:
                nested[head][rest] = value
            elif isinstance(value, dict):
                nested[head].update({str(k): v for k, v in value.items()})
            elif value is None and head in _FREE_FORM:
                nested[head] = {}
                top[head] = {}
            else:
                raise EvalConfigError(f"{head}: expected a mapping of options (or {head}.<option>=value), got {value!r}")
        elif rest or head not in hints or head.startswith("_"):
            unknown.append(key)
        else:
            top[head] = _coerce(head, value, hints[head], raw.get(key))
    for name, cls in _NESTED.items():
        sub = nested[name]
        if not sub:
            continue
        sub_hints = _type_hints(cls)
        bad = [f"{name}.{k}" for k in sub if k not in sub_hints]
        unknown.extend(bad)
        if bad:
            continue
        current = getattr(base, name)
        updates = {k: _coerce(f"{name}.{k}", v, sub_hints[k], raw.get(f"{name}.{k}")) for k, v in sub.items()}
        try:
            top[name] = replace(current, **updates)
        except ValueError as exc:
            raise EvalConfigError(f"{name}: {exc}") from exc
        if name == "block_masking":
            top["_mask_keys"] = base._mask_keys | frozenset(updates)
    for name in _FREE_FORM:
        if nested[name]:
            top[name] = {**getattr(base, name), **nested[name]}
    if unknown:
        raise _unknown(unknown)
    return replace(base, **top)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The ``eval:`` section of a YAML/JSON recipe (or its top level when it has none).

    A top-level ``block_masking:`` section is added when the eval section does not set one.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise EvalConfigError(f"recipe: {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise EvalConfigError(f"recipe: {str(p)!r} is not valid JSON: {exc}") from exc
    else:
        try:
            import yaml
        except ImportError as exc:
            raise EvalConfigError(
                f"recipe: {str(p)!r} is YAML but PyYAML is not installed; `pip install pyyaml` or use a .json recipe"
            ) from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EvalConfigError(f"recipe: {str(p)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EvalConfigError(f"recipe: {str(p)!r} must hold a mapping (with an eval: section), got {type(data).__name__}")
    if "eval" in data:
        section = data["eval"] or {}
        if not isinstance(section, dict):
            raise EvalConfigError(f"recipe: the eval: section of {str(p)!r} must be a mapping")
        section = dict(section)
        if "block_masking" not in section and isinstance(data.get("block_masking"), dict):
            section["block_masking"] = data["block_masking"]
        return section
    return data


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any], dict[str, str]]:
    """Split ``key=value`` arguments into (recipe path, parsed values, raw strings)."""
    recipe = None
    values: dict[str, Any] = {}
    raw: dict[str, str] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise EvalConfigError(
                f"argument {arg!r} is not key=value; e.g. memento-eval output_dir=out n=8 sampling.temperature=0.6"
            )
        if key == "recipe":
            recipe = text
            continue
        values[key] = _parse_scalar(text)
        raw[key] = text
    return recipe, values, raw


def build_config(argv: list[str] | None = None, base: EvalConfig | None = None) -> EvalConfig:
    """Defaults < ``recipe=PATH`` < ``key=value`` overrides, validated."""
    recipe, values, raw = parse_overrides(list(argv or []))
    cfg = base or EvalConfig()
    if recipe:
        cfg = from_dict(load_recipe(recipe), cfg)
    cfg = from_dict(values, cfg, _raw=raw)
    return with_model_mask(cfg).validate()


def with_model_mask(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` with the block-masking rule options it does not set taken from the model's export
    (``memento_train.json``); :class:`EvalConfigError` when a set one contradicts the model's rule,
    unless ``allow_mask_mismatch``. A model without that file (a hub name, ``tiny``) is left alone."""
    from memento_train.export import apply_exported_mask, exported_mask

    trained = None if cfg.is_tiny else exported_mask(cfg.model)
    if trained is None:
        return cfg
    masking, mismatches = apply_exported_mask(cfg.block_masking, trained, cfg._mask_keys)
    if mismatches and not cfg.allow_mask_mismatch:
        raise EvalConfigError(
            f"block_masking: {', '.join(mismatches)}: model={cfg.model!r} was trained with another eviction rule "
            f"(its memento_train.json), so it would be evaluated under a mask it never saw; drop the option to use "
            f"the model's, or set allow_mask_mismatch=true"
        )
    return replace(cfg, block_masking=masking)


def describe_options() -> str:
    """One line per option with its default (for ``memento-eval --help``)."""
    lines = []
    default = EvalConfig()
    for key in valid_keys():
        if key.endswith(".<name>"):
            lines.append(f"  {key}=VALUE  (free-form, passed to the engine)")
            continue
        head, _, rest = key.partition(".")
        value = getattr(getattr(default, head), rest) if rest else getattr(default, head)
        lines.append(f"  {key}={'null' if value is None else value}")
    return "\n".join(lines)


__all__ = [
    "BUILTIN_PREFIX",
    "ENGINES",
    "EvalConfig",
    "GENERATORS",
    "EvalConfigError",
    "SamplingOptions",
    "build_config",
    "builtin_problem_path",
    "describe_options",
    "from_dict",
    "load_recipe",
    "parse_overrides",
    "valid_keys",
    "with_model_mask",
]
