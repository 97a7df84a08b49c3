"""Accuracy and KV metrics of an evaluation run.

Accuracy (per problem, then averaged over problems):

- ``pass@1``: mean correctness over all ``n`` samples (= the unbiased pass@1 estimate).
- ``pass@k``: the unbiased estimator of Chen et al. 2021, ``1 - C(n-c, k) / C(n, k)`` with ``c``
  correct samples out of ``n`` (computed as a stable product).
- ``maj@k``: majority vote over the *first* ``k`` samples (in sampling order; not an average over all
  k-subsets): answers are grouped by ``math_verify`` equivalence, the largest group wins (ties: the
  group whose first member came first), samples without an answer do not vote; the problem counts
  as solved iff the winning group's answer is correct. With no answer among the first k it is unsolved.

Shape and KV (per response, then aggregated over all responses):

- response length = generated tokens; blocks per response = ``GenerationResult.num_blocks``.
- compression ratio = total summary tokens / total block tokens over all responses, pooled so long
  responses weigh by their length. Counted over *complete* blocks (closed, with a closed summary; the
  parser finds them), content only, delimiters excluded — a block cut off by ``max_new_tokens`` has no
  summary to compare with. Its inverse, block tokens per summary token ("x-fold compression"), is
  reported too. Undefined (``None``) when no response has a complete block. ``block_tokens_total`` /
  ``summary_tokens_total`` count every ``Kind.BLOCK`` / ``Kind.SUMMARY`` token.
- peak KV = max of ``kv_trace`` (live KV entries per layer, prompt included); reported as the mean
  over responses and the max over responses. KV-AUC = sum of ``kv_trace`` (entries × steps).
  Without eviction the trace would be ``kv_trace[0] + i`` (nothing is evicted before the first
  generated token); the ``*_no_evict`` figures and the ratios compare against that.
- GB figures multiply entries by the KV bytes per token of a model (:class:`KVCost`: the evaluated
  model's config via :func:`memento_train.masking.kv_bytes_per_token`, or a named geometry). GB are
  decimal (1e9 bytes); AUC in GB is GB held × decoding steps ("GB·tok").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from memento_train.evaluation.scoring import majority_class
from memento_train.generation.engine import GenerationResult
from memento_train.masking import BlockMaskingConfig, Kind, SpecialTokens, kv_bytes_per_token, parse


# -- accuracy -------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of :func:`pass_at_k` (each problem: its list of per-sample correctness)."""
    if not correct:
        return float("nan")
    return float(np.mean([pass_at_k(len(c), int(sum(map(bool, c))), k) for c in correct]))


def maj_at_k_solved(class_ids: Sequence[int | None], correct: Sequence[bool], k: int) -> bool:
    """Whether the majority answer of the first ``k`` samples of one problem is correct.

    ``class_ids[i]`` is sample i's answer-equivalence class (``None``: no answer), ``correct[i]`` its
    correctness; all members of a class are judged by the class's first member.
    """
    if not 1 <= k <= len(class_ids):
        raise ValueError(f"maj@k needs 1 <= k <= n (got k={k}, n={len(class_ids)})")
    winner = majority_class(class_ids[:k])
    if winner is None:
        return False
    return bool(correct[list(class_ids).index(winner)])


def mean_maj_at_k(class_ids: Sequence[Sequence[int | None]], correct: Sequence[Sequence[bool]], k: int) -> float:
    if not class_ids:
        return float("nan")
    return float(np.mean([maj_at_k_solved(ids, c, k) for ids, c in zip(class_ids, correct)]))


# -- KV cost model ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCost:
    """Bytes of KV one live entry costs, summed over layers.

    ``bytes_per_token`` counts every layer. When ``sliding_layers`` of the ``layers`` use a sliding
    window, those layers hold at most ``sliding_window`` entries; :meth:`bytes` then caps them at
    ``min(entries, window)`` (an upper bound: evicted tokens inside the window would be fewer).
    """

    name: str
    bytes_per_token: int
    layers: int = 1
    sliding_layers: int = 0
    sliding_window: int | None = None

    def bytes(self, entries: np.ndarray | Sequence[int] | int) -> np.ndarray:
        e = np.asarray(entries, dtype=np.float64)
        if not self.sliding_layers or not self.sliding_window:
            return e * self.bytes_per_token
        per_layer = self.bytes_per_token / self.layers
        full = self.layers - self.sliding_layers
        return per_layer * (full * e + self.sliding_layers * np.minimum(e, self.sliding_window))

    @classmethod
    def from_hf_config(cls, config: Any, dtype_bytes: int = 2, name: str | None = None) -> KVCost:
        cfg = getattr(config, "text_config", None) or config
        layers = int(cfg.num_hidden_layers)
        types_ = list(getattr(cfg, "layer_types", None) or [])
        window = getattr(cfg, "sliding_window", None)
        sliding = sum(1 for t in types_ if t == "sliding_attention") if window else 0
        return cls(
            name=name or getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "model"),
            bytes_per_token=kv_bytes_per_token(cfg, dtype_bytes),
            layers=layers,
            sliding_layers=sliding,
            sliding_window=int(window) if sliding else None,
        )

    @classmethod
    def from_geometry(cls, geometry: Any) -> KVCost:
        """From a :class:`memento_train.data.stats.KVGeometry`."""
        return cls(
            name=geometry.name,
            bytes_per_token=geometry.bytes_per_token_per_layer * geometry.layers,
            layers=geometry.layers,
            sliding_layers=geometry.sliding_layers,
            sliding_window=geometry.sliding_window,
        )


# -- per-sample record --------------------------------------------------------------------------------
@dataclass
class SampleResult:
    """One scored response: what ``generations.jsonl`` holds (plus the KV trace, kept in memory)."""

    problem_id: str
    sample_index: int
    response: str
    num_tokens: int
    prompt_tokens: int
    gold: str
    answer: str | None
    correct: bool
    peak_kv: int
    kv_auc: int
    num_blocks: int
    block_tokens: int
    summary_tokens: int
    finish_reason: str
    answer_class: int | None = None
    # Content tokens of *complete* blocks (closed, with a closed summary) and of their summaries: the
    # compression ratio uses these, so a block cut off by max_new_tokens does not count as uncompressed.
    summarized_block_tokens: int = 0
    summarized_summary_tokens: int = 0
    peak_kv_bytes: int | None = None  # measured by the engine (its own dtype), when it reports bytes
    kv_trace: list[int] = field(default_factory=list, repr=False)

    @property
    def peak_kv_no_evict(self) -> int:
        return self.kv_trace[0] + len(self.kv_trace) - 1 if self.kv_trace else 0

    @property
    def kv_auc_no_evict(self) -> int:
        n = len(self.kv_trace)
        return n * self.kv_trace[0] + n * (n - 1) // 2 if n else 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kv_trace")
        return d

    @classmethod
    def from_generation(
        cls,
        result: GenerationResult,
        *,
        problem_id: str,
        sample_index: int,
        response: str,
        gold: str,
        answer: str | None,
        correct: bool,
        answer_class: int | None = None,
        special: SpecialTokens | None = None,
    ) -> SampleResult:
        """``special`` (the tokenizer's memento ids) lets the parser find complete blocks; without it,
        every ``Kind.BLOCK``/``Kind.SUMMARY`` token counts toward the compression ratio."""
        block_all, summary_all = result.tokens_of(Kind.BLOCK), result.tokens_of(Kind.SUMMARY)
        if special is None:
            done_block, done_summary = block_all, summary_all
        else:
            done_block, done_summary = complete_block_tokens(result, special)
        return cls(
            problem_id=str(problem_id),
            sample_index=int(sample_index),
            response=response,
            num_tokens=result.num_tokens,
            prompt_tokens=len(result.prompt_ids),
            gold=str(gold),
            answer=answer,
            correct=bool(correct),
            peak_kv=result.peak_kv,
            kv_auc=result.kv_auc,
            num_blocks=result.num_blocks,
            block_tokens=block_all,
            summary_tokens=summary_all,
            finish_reason=result.finish_reason,
            answer_class=answer_class,
            summarized_block_tokens=done_block,
            summarized_summary_tokens=done_summary,
            peak_kv_bytes=max(result.kv_bytes) if result.kv_bytes else None,
            kv_trace=[int(x) for x in result.kv_trace],
        )


def complete_block_tokens(result: GenerationResult, special: SpecialTokens) -> tuple[int, int]:
    """(block content tokens, summary content tokens) over the response's complete blocks.

    Blocks come from :func:`memento_train.masking.parse` over prompt + response (the one parser), as in
    ``memento-data stats``: content strictly between the delimiters, counted for blocks whose summary
    closed within the response.
    """
    p = len(result.prompt_ids)
    parsed = parse(
        [*result.prompt_ids, *result.token_ids], special, BlockMaskingConfig(keep_last_n_blocks=-1), prompt_len=p
    )
    block = summary = 0
    for b in parsed.blocks:
        if b.start >= p and b.end is not None and b.summary_start is not None and b.summary_end is not None:
            block += b.end - b.start - 1
            summary += b.summary_end - b.summary_start - 1
    return block, summary


def group_by_problem(samples: Sequence[SampleResult]) -> dict[str, list[SampleResult]]:
    """Samples per problem id (problem order of first appearance, samples by sample_index)."""
    out: dict[str, list[SampleResult]] = {}
    for s in samples:
        out.setdefault(s.problem_id, []).append(s)
    return {pid: sorted(ss, key=lambda s: s.sample_index) for pid, ss in out.items()}


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def summarize(samples: Sequence[SampleResult], ks: Sequence[int], kv_cost: KVCost | None = None) -> dict[str, Any]:
    """All metrics as a flat, JSON-ready dict (``None`` where undefined); see the module docstring."""
    by_problem = group_by_problem(samples)
    correct = [[s.correct for s in ss] for ss in by_problem.values()]
    classes = [[s.answer_class for s in ss] for ss in by_problem.values()]
    ns = {len(c) for c in correct}
    n = min(ns) if ns else 0
    out: dict[str, Any] = {
        "num_problems": len(by_problem),
        "num_samples": len(samples),
        "samples_per_problem": n,
    }
    if samples:
        out["pass@1"] = float(np.mean([np.mean(c) for c in correct]))
    else:
        out["pass@1"] = None
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = mean_pass_at_k(correct, k)
    for k in ks:
        if k <= n:
            out[f"maj@{k}"] = mean_maj_at_k(classes, correct, k)
    out["answered_frac"] = float(np.mean([s.answer is not None for s in samples])) if samples else None

    lengths = np.asarray([s.num_tokens for s in samples], dtype=np.float64)
    out["response_tokens_mean"] = float(lengths.mean()) if samples else None
    out["response_tokens_p50"] = float(np.median(lengths)) if samples else None
    out["response_tokens_max"] = int(lengths.max()) if samples else None
    out["truncated_frac"] = float(np.mean([s.finish_reason == "length" for s in samples])) if samples else None

    block_tok = sum(s.summarized_block_tokens for s in samples)
    summary_tok = sum(s.summarized_summary_tokens for s in samples)
    out["blocks_per_response"] = float(np.mean([s.num_blocks for s in samples])) if samples else None
    out["responses_with_blocks_frac"] = float(np.mean([s.num_blocks > 0 for s in samples])) if samples else None
    out["block_tokens_total"] = int(sum(s.block_tokens for s in samples))
    out["summary_tokens_total"] = int(sum(s.summary_tokens for s in samples))
    out["summarized_block_tokens_total"] = int(block_tok)
    out["summarized_summary_tokens_total"] = int(summary_tok)
    out["compression_summary_per_block"] = _ratio(summary_tok, block_tok)
    out["compression_block_per_summary"] = _ratio(block_tok, summary_tok)

    peaks = np.asarray([s.peak_kv for s in samples], dtype=np.float64)
    aucs = np.asarray([s.kv_auc for s in samples], dtype=np.float64)
    peaks0 = np.asarray([s.peak_kv_no_evict for s in samples], dtype=np.float64)
    aucs0 = np.asarray([s.kv_auc_no_evict for s in samples], dtype=np.float64)
    has = bool(samples)
    out["peak_kv_tokens_mean"] = float(peaks.mean()) if has else None
    out["peak_kv_tokens_max"] = int(peaks.max()) if has else None
    out["kv_auc_tokens_mean"] = float(aucs.mean()) if has else None
    out["peak_kv_tokens_mean_no_evict"] = float(peaks0.mean()) if has else None
    out["kv_auc_tokens_mean_no_evict"] = float(aucs0.mean()) if has else None
    out["peak_kv_vs_no_evict"] = _ratio(peaks.mean(), peaks0.mean()) if has else None
    out["kv_auc_vs_no_evict"] = _ratio(aucs.mean(), aucs0.mean()) if has else None
    out["kv_model"] = None if kv_cost is None else kv_cost.name
    out["kv_bytes_per_token"] = None if kv_cost is None else int(kv_cost.bytes_per_token)
    if kv_cost is not None and has:
        # Peak GB: bytes are monotone in entries, so the peak entry count gives the peak bytes.
        out["peak_kv_gb_mean"] = float(np.mean(kv_cost.bytes(peaks))) / 1e9
        out["peak_kv_gb_max"] = float(np.max(kv_cost.bytes(peaks))) / 1e9
        out["kv_auc_gb_tok_mean"] = float(np.mean([kv_cost.bytes(s.kv_trace).sum() for s in samples])) / 1e9
    else:
        out["peak_kv_gb_mean"] = out["peak_kv_gb_max"] = out["kv_auc_gb_tok_mean"] = None
    measured = [s.peak_kv_bytes for s in samples]
    out["peak_kv_measured_mb_mean"] = (
        float(np.mean(measured)) / 1e6 if has and all(m is not None for m in measured) else None
    )
    return out


__all__ = [
    "KVCost",
    "SampleResult",
    "group_by_problem",
    "maj_at_k_solved",
    "mean_maj_at_k",
    "mean_pass_at_k",
    "pass_at_k",
    "summarize",
]
