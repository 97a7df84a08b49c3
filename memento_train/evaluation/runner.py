"""One evaluation run: problems → prompts → generator → scores → metrics → report files.

Prompts. Each problem becomes one user message (after the optional system prompt), rendered by
:func:`memento_train.generation.prompt.generation_prompt_ids`, the function RL rollouts, the training
data renderer and the vLLM path use: the serving chat template with ``add_generation_prompt=True``,
nothing appended (the model writes ``<think>`` itself, as it does when served), so eval accuracy is
measured on the prompts the model is trained and served with.

Grading. :class:`~.scoring.GradingRule` (``require_think_end``, ``truncated``): by default a response
that never closed ``</think>`` or hit the token budget is wrong, as RL rewards it 0.

Generators (``generator=``). ``reference``: :class:`memento_train.generation.reference.ReferenceGenerator`
over a model loaded with ``AutoModelForCausalLM.from_pretrained`` (or the tiny random Qwen3); ``vllm``:
:class:`memento_train.generation.vllm_engine.VLLMEngine` (vLLM 0.32 + the Memento plugin on CPU or GPU,
imported lazily; stopped after the run). Tests and dry runs inject any other
:class:`~memento_train.generation.engine.GenerationEngine` with :func:`generator_override`.

Stop tokens: the tokenizer's EOS, ``<|im_end|>`` and the model's ``generation_config.eos_token_id``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memento_train.config.errors import ConfigError
from memento_train.data.problems import ProblemSource, map_row, read_rows
from memento_train.evaluation import report
from memento_train.evaluation.config import EvalConfig, with_model_mask
from memento_train.evaluation.metrics import KVCost, SampleResult, summarize
from memento_train.evaluation.scoring import (
    GradingRule,
    ParsedAnswer,
    equivalence_classes,
    equivalent,
    parse_gold,
    parse_response,
)
from memento_train.generation.engine import GenerationEngine, GenerationResult
from memento_train.generation.prompt import generation_prompt_ids
from memento_train.masking import SpecialTokens
from memento_train.models import tiny_model_config
from memento_train.models.config import ModelConfig, TinyModelConfig
from memento_train.models.loading import load_model, load_tokenizer
from memento_train.tokens import IM_END, special_token_ids

GeneratorFactory = Callable[[EvalConfig, Any], GenerationEngine]
# ``model=tiny``: a seeded random 2-layer Qwen3, smaller than the training runs' default tiny model.
EVAL_TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=4096)
_GENERATOR_OVERRIDE: list[GeneratorFactory] = []


@contextlib.contextmanager
def generator_override(factory: GeneratorFactory) -> Iterator[None]:
    """Within the block, :func:`run_eval` builds its generator with ``factory(cfg, tokenizer)``.

    The internal hook the CLI tests use to run ``memento-eval`` end to end with a fake generator.
    """
    _GENERATOR_OVERRIDE.append(factory)
    try:
        yield
    finally:
        _GENERATOR_OVERRIDE.remove(factory)


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
def problem_source(cfg: EvalConfig) -> ProblemSource:
    """The problem set of ``cfg`` as a :class:`~memento_train.data.problems.ProblemSource`."""
    return ProblemSource(
        path=cfg.problems_path(),
        hf_config=cfg.problems_config,
        split=cfg.split,
        problem_field=cfg.problem_field,
        answer_field=cfg.answer_field,
    )


def load_problem_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    """Raw rows of the problem set (local JSONL/JSON/Parquet file or directory, or a hub dataset)."""
    return read_rows(problem_source(cfg))


def load_problems(cfg: EvalConfig) -> list[Problem]:
    """Problems with ids; raises ``ValueError`` naming the record and field when one is missing."""
    rows = load_problem_rows(cfg)
    if not rows:
        raise ValueError(f"problem set {cfg.problems!r} is empty")
    out: list[Problem] = []
    seen: dict[str, int] = {}
    source = problem_source(cfg)
    for i, row in enumerate(rows):
        pid = row.get(cfg.id_field)
        pid = f"row{i}" if pid is None or str(pid) == "" else str(pid)
        rec = map_row(row, source, i, record_id=pid)
        if pid in seen:
            raise ValueError(f"problem set {cfg.problems!r}: id {pid!r} appears twice (rows {seen[pid]} and {i})")
        if isinstance(rec["answer"], list):
            raise ValueError(
                f"problem set {cfg.problems!r}, record {pid!r}: {len(rec['answer'])} different gold "
                f"answers in {cfg.answer_field!r}; memento-eval grades against one"
            )
        seen[pid] = i
        out.append(Problem(id=pid, problem=rec["problem"], answer=rec["answer"]))
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
    return out


# -- model, tokenizer, engine ----------------------------------------------------------------------------
def _model_config(cfg: EvalConfig) -> ModelConfig:
    """The evaluated model as :func:`~memento_train.models.loading.load_model` takes it: ``model=tiny`` is
    the random :data:`EVAL_TINY` model with the shipped tokenizer (unless ``tokenizer`` is set)."""
    return ModelConfig(path=None if cfg.is_tiny else cfg.model, tokenizer=cfg.tokenizer, tiny=EVAL_TINY)


def _device_and_dtype(cfg: EvalConfig) -> tuple[str, Any]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} requested but CUDA is not available (use device=cpu)")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def build_generator(cfg: EvalConfig, tokenizer: Any) -> GenerationEngine:
    """The configured generator (or the :func:`generator_override` factory's). Not to be confused
    with :func:`memento_train.engines.build_engine`, which builds a *training* engine."""
    if _GENERATOR_OVERRIDE:
        return _GENERATOR_OVERRIDE[-1](cfg, tokenizer)
    if cfg.generator == "reference":
        try:
            from memento_train.generation.reference import ReferenceGenerator
        except ImportError as exc:
            raise RuntimeError(
                f"generator=reference needs memento_train.generation.reference.ReferenceGenerator ({exc})"
            ) from exc
        device, dtype = _device_and_dtype(cfg)
        model = load_model(_model_config(cfg), tokenizer, seed=cfg.seed, training=False, dtype=dtype, device=device)
        return ReferenceGenerator(model, tokenizer, cfg.block_masking, **cfg.generator_kwargs)
    if cfg.generator == "vllm":
        import torch

        from memento_train.generation.vllm_engine import VLLMEngine

        # dtype=auto: as for the reference model, float32 on CPU (vLLM's CPU build) and bfloat16 on CUDA.
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        return VLLMEngine(
            cfg.model, cfg.block_masking, tokenizer=cfg.tokenizer, dtype=dtype, seed=cfg.seed, **cfg.generator_kwargs
        )
    raise ConfigError(f"generator must be one of reference, vllm; got {cfg.generator!r}")


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
            raise ConfigError(f"kv_geometry: {exc}") from exc
    if cfg.is_tiny:
        tiny = tiny_model_config(tokenizer, **asdict(EVAL_TINY))
        return KVCost.from_hf_config(tiny, cfg.kv_dtype_bytes, name="tiny-qwen3"), None
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.model)
    except Exception as exc:  # noqa: BLE001 - GB figures are optional
        return None, f"KV GB figures skipped: could not read the model config of {cfg.model!r} ({exc})"
    name = os.path.basename(os.path.normpath(cfg.model)) or cfg.model
    return KVCost.from_hf_config(hf, cfg.kv_dtype_bytes, name=name), None


# -- prompts -------------------------------------------------------------------------------------------
def render_prompts(tokenizer: Any, problems: Sequence[Problem], system_prompt: str | None = None) -> list[list[int]]:
    """Prompt token ids per problem: :func:`~memento_train.generation.prompt.generation_prompt_ids`."""
    return [generation_prompt_ids(tokenizer, p.problem, system_prompt) for p in problems]


# -- the run ---------------------------------------------------------------------------------------------
def _generate_and_score(
    cfg: EvalConfig, engine: Any, tokenizer: Any, problems: Sequence[Problem], prompts: list[list[int]]
) -> tuple[list[SampleResult], float, tuple[int, ...]]:
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
        chunk = problems[start : start + cfg.batch_size]
        params = cfg.sampling_params(stop_token_ids=stops, seed=cfg.seed + b)
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            # Evaluation never uses log-probs; the vLLM adapter's inexact-logprobs warning is noise here.
            warnings.filterwarnings("ignore", message=r".*log-probs differ.*")
            results = engine.generate(prompts[start : start + cfg.batch_size], params)
        t_gen += time.perf_counter() - t1
        _check_results(results, len(chunk), cfg.n, engine)
        for problem, res in zip(chunk, results):
            samples.extend(score_problem(problem, res, tokenizer, special, cfg.grading_rule))
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
            raise RuntimeError(
                f"engine {name} returned {len(r)} results for prompt {i}, expected n={n} GenerationResults"
            )


def score_problem(
    problem: Problem,
    results: Sequence[GenerationResult],
    tokenizer: Any,
    special: SpecialTokens | None = None,
    rule: GradingRule | None = None,
) -> list[SampleResult]:
    """Per response: its extracted answer, correctness and majority class. Responses the grading
    ``rule`` (default :class:`~.scoring.GradingRule`: no ``</think>`` or truncated) rejects have no
    answer: wrong, and no vote in maj@k."""
    rule = rule or GradingRule()
    gold = parse_gold(problem.answer)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=False) for r in results]
    preds = [
        ParsedAnswer(None, ()) if rule.ungraded_reason(t, r.finish_reason) else parse_response(t)
        for t, r in zip(texts, results)
    ]
    classes = equivalence_classes(preds)
    return [
        SampleResult.from_generation(
            r,
            problem_id=problem.id,
            sample_index=i,
            response=texts[i],
            gold=problem.answer,
            answer=preds[i].text,
            correct=equivalent(gold, preds[i]),
            answer_class=classes[i],
            special=special,
        )
        for i, r in enumerate(results)
    ]


def run_eval(cfg: EvalConfig, *, stream: Any = None) -> EvalOutcome:
    """Run the configured evaluation end to end and write the report under ``cfg.output_dir``."""
    stream = sys.stdout if stream is None else stream
    t0 = time.perf_counter()
    cfg = with_model_mask(cfg).validate()
    out_dir = Path(os.path.expanduser(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = load_problems(cfg)
    mcfg = _model_config(cfg)
    # As the checkpoint ships it: a checkpoint without the memento tokens is named by the special-token
    # check rather than given ids its model does not know.
    tokenizer = load_tokenizer(mcfg.tokenizer or mcfg.path, add_memento_tokens=False)
    prompts = render_prompts(tokenizer, problems, cfg.system_prompt)
    kv_cost, kv_note = kv_cost_for(cfg, tokenizer)
    engine = build_generator(cfg, tokenizer)
    try:
        samples, t_gen, stops = _generate_and_score(cfg, engine, tokenizer, problems, prompts)
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:  # vLLM: stop its engine processes
            shutdown()

    metrics = summarize(samples, cfg.ks, kv_cost)
    engine_name = type(engine).__name__
    notes = []
    if _GENERATOR_OVERRIDE:
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
    "build_generator",
    "generator_override",
    "kv_cost_for",
    "load_problems",
    "render_prompts",
    "run_eval",
    "score_problem",
    "stop_token_ids",
]
