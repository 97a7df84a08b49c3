"""One evaluation run: problems → prompts → engine → scores → metrics → report files.

Prompts. Each problem becomes one user message (after the optional system prompt), rendered with the
tokenizer's chat template and ``add_generation_prompt=True`` by the same
:class:`memento_train.data.render.Renderer` that renders training data (literal ChatML when the
tokenizer has no template). Training responses start with ``<think>\\n``, so ``<think>\\n`` is appended
— tokenized separately, exactly as the training renderer tokenizes the response — unless the
template's generation prompt already contains ``<think>`` (some templates open or, with thinking
disabled, open-and-close it themselves; then it is left as the template wrote it).

Generators (``generator=``). ``reference``: :class:`memento_train.generation.reference.ReferenceGenerator`
over a model loaded with ``AutoModelForCausalLM.from_pretrained`` (or the tiny random Qwen3); ``vllm``:
:class:`memento_train.generation.vllm_engine.VLLMEngine` (vLLM 0.32 + the Memento plugin on CPU or GPU,
imported lazily; stopped after the run). Tests and dry runs inject any other
:class:`~memento_train.generation.engine.GenerationEngine` with :func:`engine_override`.

Stop tokens: the tokenizer's EOS, ``<|im_end|>`` and the model's ``generation_config.eos_token_id``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memento_train.generation.engine import GenerationEngine, GenerationResult
from memento_train.masking import SpecialTokens
from memento_train.models import build_tiny_model, tiny_model_config
from memento_train.tokens import IM_END, THINK_START, special_token_ids

from . import report
from .config import EvalConfig, EvalConfigError
from .metrics import KVCost, SampleResult, summarize
from .scoring import equivalence_classes, equivalent, parse_gold, parse_response

THINK_OPEN = THINK_START + "\n"

EngineFactory = Callable[[EvalConfig, Any], GenerationEngine]
_ENGINE_OVERRIDE: list[EngineFactory] = []


@contextlib.contextmanager
def engine_override(factory: EngineFactory) -> Iterator[None]:
    """Within the block, :func:`run_eval` builds its engine with ``factory(cfg, tokenizer)``.

    The internal hook the CLI tests use to run ``memento-eval`` end to end with a fake engine.
    """
    _ENGINE_OVERRIDE.append(factory)
    try:
        yield
    finally:
        _ENGINE_OVERRIDE.remove(factory)


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


@dataclass
class EvalOutcome:
    """What :func:`run_eval` returns: per-response results, metrics and the files written."""

    samples: list[SampleResult]
    metrics: dict[str, Any]
    table: str
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


# -- problems ----------------------------------------------------------------------------------------
def _read_local_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"problems file {str(path)!r} is not valid JSON: {exc}") from exc
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"problems file {str(path)!r}: every entry of the JSON list must be an object")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"problems file {str(path)!r} line {lineno} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"problems file {str(path)!r} line {lineno} is not a JSON object")
        rows.append(row)
    return rows


def load_problem_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Raw rows of the problem set (local JSONL/JSON/Parquet file or directory, or a hub dataset)."""
    from memento_train.data.records import resolve_local_files

    source = cfg.problems_path()
    local = resolve_local_files(source)
    if local is not None:
        _, files = local
        rows: list[dict[str, Any]] = []
        for f in files:
            rows.extend(_read_local_rows(Path(f)))
        return rows
    import datasets

    try:
        ds = datasets.load_dataset(source, cfg.problems_config, split=cfg.split)
    except Exception as exc:
        raise ValueError(
            f"could not load hub dataset {source!r} (config {cfg.problems_config!r}, split {cfg.split!r}): {exc}. "
            "Pass a local .jsonl/.json/.parquet file if you are offline."
        ) from exc
    return [dict(r) for r in ds]


def load_problems(cfg: EvalConfig) -> list[Problem]:
    """Problems with ids; raises ``ValueError`` naming the record and field when one is missing."""
    rows = load_problem_rows(cfg)
    if not rows:
        raise ValueError(f"problem set {cfg.problems!r} is empty")
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        pid = row.get(cfg.id_field)
        pid = f"row{i}" if pid is None or str(pid) == "" else str(pid)
        for name in (cfg.problem_field, cfg.answer_field):
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                have = ", ".join(sorted(map(str, row)))
                hint = f" (set {'problem' if name == cfg.problem_field else 'answer'}_field=COLUMN)" if name not in row else ""
                raise ValueError(
                    f"problem set {cfg.problems!r}, record {pid!r} (row {i}): field {name!r} is missing or empty; "
                    f"the record has: {have}{hint}"
                )
        if pid in seen:
            raise ValueError(f"problem set {cfg.problems!r}: id {pid!r} appears twice (rows {seen[pid]} and {i})")
        seen[pid] = i
        out.append(Problem(id=pid, problem=str(row[cfg.problem_field]), answer=str(row[cfg.answer_field])))
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
    return out


# -- model, tokenizer, engine ----------------------------------------------------------------------------
def load_tokenizer(cfg: EvalConfig) -> Any:
    """The shipped tokenizer for ``model=tiny`` (unless ``tokenizer`` is set), else the model's."""
    from memento_train.data.render import load_tokenizer as _load

    if cfg.tokenizer is None and cfg.is_tiny:
        return _load(None)
    return _load(cfg.tokenizer or cfg.model)


def _device_and_dtype(cfg: EvalConfig) -> tuple[str, Any]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalConfigError(f"device: {cfg.device!r} requested but CUDA is not available (use device=cpu)")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def load_model(cfg: EvalConfig, tokenizer: Any) -> Any:
    """The tiny model, or ``AutoModelForCausalLM.from_pretrained(cfg.model)`` on the configured device."""
    device, dtype = _device_and_dtype(cfg)
    if cfg.is_tiny:
        return build_tiny_model(tokenizer, seed=cfg.seed, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except Exception as exc:
        raise ValueError(f"could not load model {cfg.model!r}: {exc}") from exc
    return model.to(device).eval()


def build_engine(cfg: EvalConfig, tokenizer: Any) -> GenerationEngine:
    """The configured generator (or the :func:`engine_override` factory's)."""
    if _ENGINE_OVERRIDE:
        return _ENGINE_OVERRIDE[-1](cfg, tokenizer)
    if cfg.generator == "reference":
        try:
            from memento_train.generation.reference import ReferenceGenerator
        except ImportError as exc:
            raise RuntimeError(
                f"generator=reference needs memento_train.generation.reference.ReferenceGenerator ({exc})"
            ) from exc
        model = load_model(cfg, tokenizer)
        return ReferenceGenerator(model, tokenizer, cfg.block_masking, **cfg.engine_kwargs)
    if cfg.generator == "vllm":
        import torch

        from memento_train.generation.vllm_engine import VLLMEngine

        # dtype=auto: as for the reference model, float32 on CPU (vLLM's CPU build) and bfloat16 on CUDA.
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        return VLLMEngine(
            cfg.model, cfg.block_masking, tokenizer=cfg.tokenizer, dtype=dtype, seed=cfg.seed, **cfg.engine_kwargs
        )
    raise EvalConfigError(f"generator: unknown generator {cfg.generator!r}")


def stop_token_ids(tokenizer: Any, engine: Any = None) -> tuple[int, ...]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is not None:
        ids.add(int(im_end))
    model = getattr(engine, "model", None)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return tuple(sorted(ids))


def kv_cost_for(cfg: EvalConfig, tokenizer: Any) -> tuple[KVCost | None, str | None]:
    """The KV cost model for GB figures, and a note when it could not be determined."""
    if cfg.kv_geometry != "auto":
        from memento_train.data.stats import load_geometry

        try:
            return KVCost.from_geometry(load_geometry(os.path.expanduser(cfg.kv_geometry), cfg.kv_dtype_bytes)), None
        except ValueError as exc:
            raise EvalConfigError(f"kv_geometry: {exc}") from exc
    if cfg.is_tiny:
        return KVCost.from_hf_config(tiny_model_config(tokenizer), cfg.kv_dtype_bytes, name="tiny-qwen3"), None
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.model)
    except Exception as exc:  # noqa: BLE001 - GB figures are optional
        return None, f"KV GB figures skipped: could not read the model config of {cfg.model!r} ({exc})"
    name = os.path.basename(os.path.normpath(cfg.model)) or cfg.model
    return KVCost.from_hf_config(hf, cfg.kv_dtype_bytes, name=name), None


# -- prompts -------------------------------------------------------------------------------------------
def render_prompts(tokenizer: Any, problems: Sequence[Problem], system_prompt: str | None = None) -> list[list[int]]:
    """Prompt token ids per problem (chat template + generation prompt, then ``<think>\\n`` if not open)."""
    from memento_train.data.render import Renderer

    renderer = Renderer(tokenizer, system_prompt=system_prompt)

    def encode(text: str) -> list[int]:  # as the training renderer: no BOS/EOS added
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    think_ids = encode(THINK_OPEN)
    out = []
    for p in problems:
        text = renderer.prompt_text(p.problem)
        at = text.rfind(p.problem)
        tail = text[at + len(p.problem):] if at >= 0 else text[-64:]
        ids = encode(text)
        if THINK_START not in tail:
            ids = ids + think_ids
        out.append(ids)
    return out


# -- the run ---------------------------------------------------------------------------------------------
def _generate_and_score(cfg: EvalConfig, engine: Any, tokenizer: Any, problems: Sequence[Problem],
                        prompts: list[list[int]]) -> tuple[list[SampleResult], float, tuple[int, ...]]:
    """Every problem's ``n`` samples, scored; seconds spent generating; the stop ids used."""
    from tqdm.auto import tqdm

    stops = stop_token_ids(tokenizer, engine)
    special = SpecialTokens.from_mapping(special_token_ids(tokenizer))
    samples: list[SampleResult] = []
    # progress=false disables the bar; otherwise tqdm's defaults and TQDM_* environment variables apply.
    bar_kwargs = {} if cfg.progress else {"disable": True}
    bar = tqdm(total=len(problems), unit="problem", desc="memento-eval", file=sys.stderr, **bar_kwargs)
    t_gen = 0.0
    for b, start in enumerate(range(0, len(problems), cfg.batch_size)):
        chunk = problems[start:start + cfg.batch_size]
        params = cfg.sampling_params(stop_token_ids=stops, seed=cfg.seed + b)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            # Evaluation never uses log-probs; the vLLM adapter's inexact-logprobs warning is noise here.
            warnings.filterwarnings("ignore", message=r".*log-probs differ.*")
            results = engine.generate(prompts[start:start + cfg.batch_size], params)
        t_gen += time.perf_counter() - t1
        _check_results(results, len(chunk), cfg.n, engine)
        for problem, res in zip(chunk, results):
            samples.extend(score_problem(problem, res, tokenizer, special))
        bar.update(len(chunk))
    bar.close()
    return samples, t_gen, stops


def _check_results(results: Any, prompts: int, n: int, engine: Any) -> None:
    name = type(engine).__name__
    if not isinstance(results, list) or len(results) != prompts:
        got = len(results) if isinstance(results, list) else type(results).__name__
        raise RuntimeError(f"engine {name} returned {got} result lists for {prompts} prompts")
    for i, r in enumerate(results):
        if len(r) != n or not all(isinstance(x, GenerationResult) for x in r):
            raise RuntimeError(f"engine {name} returned {len(r)} results for prompt {i}, expected n={n} GenerationResults")


def score_problem(
    problem: Problem, results: Sequence[GenerationResult], tokenizer: Any, special: SpecialTokens | None = None
) -> list[SampleResult]:
    gold = parse_gold(problem.answer)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=False) for r in results]
    preds = [parse_response(t) for t in texts]
    classes = equivalence_classes(preds)
    return [
        SampleResult.from_generation(
            r, problem_id=problem.id, sample_index=i, response=texts[i], gold=problem.answer,
            answer=preds[i].text, correct=equivalent(gold, preds[i]), answer_class=classes[i], special=special,
        )
        for i, r in enumerate(results)
    ]


def run_eval(cfg: EvalConfig, *, stream: Any = None) -> EvalOutcome:
    """Run the configured evaluation end to end and write the report under ``cfg.output_dir``."""
    stream = sys.stdout if stream is None else stream
    t0 = time.perf_counter()
    cfg.validate()
    out_dir = Path(os.path.expanduser(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg)
    tokenizer = load_tokenizer(cfg)
    prompts = render_prompts(tokenizer, problems, cfg.system_prompt)
    kv_cost, kv_note = kv_cost_for(cfg, tokenizer)
    engine = build_engine(cfg, tokenizer)
    try:
        samples, t_gen, stops = _generate_and_score(cfg, engine, tokenizer, problems, prompts)
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:  # vLLM: stop its engine processes
            shutdown()


    metrics = summarize(samples, cfg.ks, kv_cost)
    engine_name = type(engine).__name__
    notes = []
    if _ENGINE_OVERRIDE:
        notes.append(f"engine overridden in process: responses come from {engine_name}, not from model={cfg.model}.")
    elif cfg.is_tiny:
        notes.append(
            "model=tiny is a seeded random-weight 2-layer Qwen3: a plumbing check. Accuracy ~0 and ~0 memento "
            "blocks per response are expected; pass a trained checkpoint with model=PATH for real numbers."
        )
    if kv_note:
        notes.append(kv_note)
    if kv_cost is not None and kv_cost.sliding_layers:
        notes.append(f"{kv_cost.name}: sliding-window layers counted at min(live entries, window) — an upper bound.")
    meta = {
        "engine": engine_name,
        "seconds_total": None,
        "seconds_generate": round(t_gen, 3),
        "generated_tokens": int(sum(s.num_tokens for s in samples)),
        "stop_token_ids": list(stops),
        "notes": notes,
    }
    files = {
        "generations": str(out_dir / report.GENERATIONS),
        "summary_json": str(out_dir / report.SUMMARY_JSON),
        "summary_md": str(out_dir / report.SUMMARY_MD),
    }
    report.write_generations(files["generations"], samples)
    bm = cfg.block_masking
    evict = f"keep_last_n_blocks={bm.keep_last_n_blocks}" if bm.enable else "eviction off"
    subtitle = f"model={cfg.model}, generator={cfg.generator} ({engine_name}), {evict}"
    (out_dir / report.SAWTOOTH_PNG).unlink(missing_ok=True)  # never leave a previous run's plot behind
    if cfg.plot_samples:
        plotted = report.plot_kv_sawtooth(
            out_dir / report.SAWTOOTH_PNG, samples, count=cfg.plot_samples, kv_cost=kv_cost, subtitle=subtitle
        )
        if plotted:
            files["kv_sawtooth"] = str(out_dir / report.SAWTOOTH_PNG)
    seconds = time.perf_counter() - t0
    meta["seconds_total"] = round(seconds, 3)
    title = f"memento-eval: {cfg.problems} — {subtitle}"
    table = report.write_summary(out_dir, metrics, cfg.to_dict(), meta, title=title)
    print(table, file=stream)
    for note in notes:
        print(f"note: {note}", file=stream)
    for name, path in files.items():
        print(f"wrote {name}: {path}", file=stream)
    return EvalOutcome(samples=samples, metrics=metrics, table=table, files=files, seconds=seconds)


__all__ = [
    "EvalOutcome",
    "Problem",
    "build_engine",
    "engine_override",
    "kv_cost_for",
    "load_model",
    "load_problems",
    "load_tokenizer",
    "render_prompts",
    "run_eval",
    "score_problem",
    "stop_token_ids",
]
