"""Files an evaluation run writes under ``output_dir``.

- ``generations.jsonl``: one line per response — ``problem_id``, ``sample_index``, ``response`` (decoded
  with special tokens; the prompt ended with ``<think>\\n``), ``num_tokens``, ``prompt_tokens``, ``gold``,
  ``answer`` (extracted text or null), ``correct``, ``answer_class`` (math-verify equivalence class
  within the problem), ``peak_kv``, ``kv_auc`` (tokens), ``num_blocks``, ``block_tokens``,
  ``summary_tokens``, ``finish_reason``, ``peak_kv_bytes`` (engine-measured, or null).
- ``summary.json``: ``{"metrics": {...}, "config": {...}, "meta": {...}}`` (metrics as in
  :func:`memento_train.evaluation.metrics.summarize`; ``null`` where undefined).
- ``summary.md``: the same metrics as a readable Markdown table (also printed to stdout).
- ``kv_sawtooth.png``: live KV entries vs generated token for a few responses (those with the most
  blocks), with the no-eviction line for comparison.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from memento_train.evaluation.metrics import KVCost, SampleResult

GENERATIONS = "generations.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SAWTOOTH_PNG = "kv_sawtooth.png"


def write_generations(path: str | os.PathLike, samples: Sequence[SampleResult]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")


def read_generations(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:  # nan
            return "n/a"
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 1e-3:
            return f"{x:.3g}"
        return f"{x:.{digits}f}"
    return str(x)


def table_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the summary table, in display order."""
    m = metrics
    rows: list[tuple[str, str]] = [
        ("problems × samples", f"{m.get('num_problems', 0)} × {m.get('samples_per_problem', 0)}"),
        ("pass@1", _fmt(m.get("pass@1"))),
    ]
    rows += [(k, _fmt(v)) for k, v in m.items() if k.startswith("pass@") and k != "pass@1"]
    rows += [(k, _fmt(v)) for k, v in m.items() if k.startswith("maj@")]
    rows += [
        ("answered (any answer extracted)", _fmt(m.get("answered_frac"))),
        (
            "response length, tokens (mean / p50 / max)",
            f"{_fmt(m.get('response_tokens_mean'), 1)} / {_fmt(m.get('response_tokens_p50'), 1)} / "
            f"{_fmt(m.get('response_tokens_max'))}",
        ),
        ("truncated at max_new_tokens", _fmt(m.get("truncated_frac"))),
        ("blocks per response", _fmt(m.get("blocks_per_response"), 2)),
        ("responses with ≥1 block", _fmt(m.get("responses_with_blocks_frac"))),
        ("compression ratio (summary / block tokens)", _fmt(m.get("compression_summary_per_block"))),
        ("  inverse: block / summary tokens (x-fold)", _fmt(m.get("compression_block_per_summary"), 2)),
        (
            "peak KV, tokens (mean / max)",
            f"{_fmt(m.get('peak_kv_tokens_mean'), 1)} / {_fmt(m.get('peak_kv_tokens_max'))}",
        ),
        ("  without eviction (mean)", _fmt(m.get("peak_kv_tokens_mean_no_evict"), 1)),
        ("  ratio to no eviction", _fmt(m.get("peak_kv_vs_no_evict"))),
        ("KV-AUC, token·steps (mean)", _fmt(m.get("kv_auc_tokens_mean"), 1)),
        ("  without eviction (mean)", _fmt(m.get("kv_auc_tokens_mean_no_evict"), 1)),
        ("  ratio to no eviction", _fmt(m.get("kv_auc_vs_no_evict"))),
    ]
    if m.get("kv_model") is not None:
        label = f"{m['kv_model']}, {_fmt(m.get('kv_bytes_per_token'))} B/token"
        rows += [
            (
                f"peak KV, GB (mean / max) [{label}]",
                f"{_fmt(m.get('peak_kv_gb_mean'), 4)} / {_fmt(m.get('peak_kv_gb_max'), 4)}",
            ),
            (f"KV-AUC, GB·steps (mean) [{label}]", _fmt(m.get("kv_auc_gb_tok_mean"), 4)),
        ]
    if m.get("peak_kv_measured_mb_mean") is not None:
        rows.append(("peak KV measured by the engine, MB (mean)", _fmt(m["peak_kv_measured_mb_mean"])))
    return rows


def format_table(metrics: dict[str, Any], title: str | None = None) -> str:
    """The metrics as a Markdown table."""
    rows = table_rows(metrics)
    w = max(len(r[0]) for r in rows)
    v = max(max(len(r[1]) for r in rows), len("value"))
    lines = [f"## {title}", ""] if title else []
    lines.append(f"| {'metric'.ljust(w)} | {'value'.rjust(v)} |")
    lines.append(f"|{'-' * (w + 2)}|{'-' * (v + 1)}:|")
    lines += [f"| {a.ljust(w)} | {b.rjust(v)} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def write_summary(
    output_dir: str | os.PathLike,
    metrics: dict[str, Any],
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    title: str | None = None,
) -> str:
    """Write ``summary.json`` and ``summary.md``; returns the Markdown table."""
    with open(os.path.join(output_dir, SUMMARY_JSON), "w", encoding="utf-8") as f:
        json.dump({"metrics": metrics, "config": config or {}, "meta": meta or {}}, f, indent=2, default=str)
    table = format_table(metrics, title)
    notes = []
    for key, value in (meta or {}).items():
        if key == "notes":
            notes.extend(f"- {n}" for n in value)
    with open(os.path.join(output_dir, SUMMARY_MD), "w", encoding="utf-8") as f:
        f.write(table)
        if notes:
            f.write("\n" + "\n".join(notes) + "\n")
    return table


def pick_plot_samples(samples: Sequence[SampleResult], count: int) -> list[SampleResult]:
    """Up to ``count`` responses with the most blocks (then the longest), one per problem first."""
    ranked = sorted(samples, key=lambda s: (-s.num_blocks, -s.num_tokens, s.problem_id, s.sample_index))
    chosen: list[SampleResult] = []
    problems: set[str] = set()
    taken: set[int] = set()
    for distinct in (True, False):  # first one response per problem, then fill up
        for s in ranked:
            if len(chosen) >= count:
                break
            if not s.kv_trace or id(s) in taken or (distinct and s.problem_id in problems):
                continue
            chosen.append(s)
            problems.add(s.problem_id)
            taken.add(id(s))
    return chosen


def plot_kv_sawtooth(
    path: str | os.PathLike,
    samples: Sequence[SampleResult],
    *,
    count: int = 4,
    kv_cost: KVCost | None = None,
    subtitle: str = "",
) -> list[SampleResult]:
    """Save the KV sawtooth PNG; returns the plotted samples (nothing is written when there are none)."""
    chosen = pick_plot_samples(samples, count)
    if not chosen:
        return []
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(chosen):
        c = colors[i % len(colors)]
        xs = range(len(s.kv_trace))
        ax.plot(
            xs,
            s.kv_trace,
            color=c,
            lw=1.4,
            label=f"{s.problem_id} #{s.sample_index}: {s.num_blocks} blocks, peak {s.peak_kv}",
        )
        ax.plot(xs, [s.kv_trace[0] + j for j in xs], color=c, lw=0.8, ls="--", alpha=0.5)
    ax.plot([], [], color="gray", ls="--", lw=0.8, label="same response without eviction")
    ax.set_xlabel("generated token")
    ax.set_ylabel("live KV entries per layer (prompt included)")
    title = "Live KV cache during generation (memento eviction)"
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    if kv_cost is not None and not kv_cost.sliding_layers:
        per = kv_cost.bytes_per_token / 1e6
        sec = ax.secondary_yaxis("right", functions=(lambda e: e * per, lambda mb: mb / per))
        sec.set_ylabel(f"MB of KV, all layers ({kv_cost.name}, {kv_cost.bytes_per_token:,} B/token)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return chosen


__all__ = [
    "GENERATIONS",
    "SAWTOOTH_PNG",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "format_table",
    "pick_plot_samples",
    "plot_kv_sawtooth",
    "read_generations",
    "table_rows",
    "write_generations",
    "write_summary",
]
