"""Dataset statistics: block/summary lengths, compression, simulated KV savings, packing efficiency.

Block structure comes from the parser; KV numbers come from :func:`memento_train.masking.live_kv_trace`
over the kill rows for ``keep_last_n_blocks = -1`` (plain causal: every key stays) and ``= 0`` (each
block evicted at its summary end), with the dataset's ``mask_delimiters`` /
``keep_last_block_for_answer``. "Peak" is the most KV entries live at any decoding step of one
trace; "AUC" is their sum over steps (the KV-memory × time a serving engine pays).

Gigabytes use a model's KV geometry: the built-in :data:`KV_GEOMETRY` table (no download) or an HF
``config.json``. Sliding-window layers hold at most ``window`` keys, so they are accounted with the
window applied (Olmo 3 interleaves three sliding layers per full layer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from memento_train.data.pack import PackingStats, plan_bins
from memento_train.data.render import RenderedExample, Renderer
from memento_train.data.validate import ValidationReport
from memento_train.masking import live_kv_trace, parse


@dataclass(frozen=True)
class KVGeometry:
    """KV-cache shape of a model: bytes per token per layer = kv_heads * head_dim * 2 (K, V) * dtype_bytes."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    sliding_layers: int = 0  # how many of ``layers`` use a sliding window
    sliding_window: int | None = None
    dtype_bytes: int = 2
    note: str = ""

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.kv_heads * self.head_dim * 2 * self.dtype_bytes

    def live_bytes(self, kill_row: np.ndarray) -> np.ndarray:
        """Bytes of KV live at every decoding step (all layers; sliding layers capped at the window)."""
        full = self.layers - self.sliding_layers
        trace = full * live_kv_trace(kill_row).astype(np.float64)
        if self.sliding_layers:
            trace += self.sliding_layers * live_kv_trace(kill_row, window=self.sliding_window)
        return trace * self.bytes_per_token_per_layer


KV_GEOMETRY: dict[str, KVGeometry] = {
    "qwen3-8b": KVGeometry("qwen3-8b", 36, 8, 128),
    "qwen3-32b": KVGeometry("qwen3-32b", 64, 8, 128),
    "phi-4": KVGeometry("phi-4", 40, 10, 128),
    "olmo-3-7b": KVGeometry(
        "olmo-3-7b",
        32,
        32,
        128,
        sliding_layers=24,
        sliding_window=4096,
        note="24 of 32 layers use a 4096-token sliding window; pass its config.json to be exact",
    ),
}


def load_geometry(spec: str, dtype_bytes: int = 2) -> KVGeometry:
    """A built-in name from :data:`KV_GEOMETRY` or a path to an HF ``config.json`` (or its directory)."""
    if spec in KV_GEOMETRY:
        return replace(KV_GEOMETRY[spec], dtype_bytes=dtype_bytes)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(
            f"--model-config {spec!r} is neither a built-in model ({', '.join(KV_GEOMETRY)}) "
            "nor an existing config.json"
        )
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg)
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot read KV geometry from {path}: {exc!r} (needs num_hidden_layers, "
            "num_attention_heads, hidden_size or head_dim)"
        ) from exc
    layer_types = cfg.get("layer_types") or []
    sliding = sum(1 for t in layer_types if t == "sliding_attention")
    window = cfg.get("sliding_window")
    if not layer_types and window and cfg.get("use_sliding_window"):
        sliding = layers  # Qwen2-style: every layer slides when enabled
    if not window:
        sliding = 0
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    return KVGeometry(name, layers, kv_heads, head_dim, sliding, int(window) if sliding else None, dtype_bytes)


@dataclass
class TraceStats:
    """Per-trace numbers (token counts)."""

    record_id: str
    domain: str
    num_tokens: int
    response_tokens: int
    block_tokens: list[int]
    summary_tokens: list[int]
    peak_causal: int
    peak_memento: int
    auc_causal: int
    auc_memento: int
    peak_bytes_causal: float = 0.0
    peak_bytes_memento: float = 0.0


def trace_stats(example: RenderedExample, renderer: Renderer, geometry: KVGeometry | None = None) -> TraceStats:
    """Lengths from the parsed blocks; KV for keep_last_n_blocks -1 vs 0 from two parses."""
    ids = example.input_ids
    kill = {}
    for keep in (-1, 0):
        mask = replace(renderer.mask, keep_last_n_blocks=keep)
        kill[keep] = parse(ids, renderer.special, mask, prompt_len=example.prompt_len).kill_row
    parsed = example.parsed or parse(ids, renderer.special, renderer.mask, prompt_len=example.prompt_len)
    blocks = [b.end - b.start - 1 for b in parsed.blocks if b.end is not None]
    summaries = [b.summary_end - b.summary_start - 1 for b in parsed.blocks if b.summary_end is not None]
    tr = {k: live_kv_trace(v) for k, v in kill.items()}
    st = TraceStats(
        record_id=example.record_id,
        domain=example.domain or "unknown",
        num_tokens=example.num_tokens,
        response_tokens=example.num_tokens - example.prompt_len,
        block_tokens=blocks,
        summary_tokens=summaries,
        peak_causal=int(tr[-1].max()),
        peak_memento=int(tr[0].max()),
        auc_causal=int(tr[-1].sum()),
        auc_memento=int(tr[0].sum()),
    )
    if geometry is not None:
        st.peak_bytes_causal = float(geometry.live_bytes(kill[-1]).max())
        st.peak_bytes_memento = float(geometry.live_bytes(kill[0]).max())
    return st


def _dist(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "min": 0.0, "max": 0.0}
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def summarize(traces: Sequence[TraceStats]) -> dict[str, Any]:
    """Aggregate :class:`TraceStats` of one group (a domain, or all)."""
    blocks = [n for t in traces for n in t.block_tokens]
    summaries = [n for t in traces for n in t.summary_tokens]
    pc = [t.peak_causal for t in traces]
    pm = [t.peak_memento for t in traces]
    out = {
        "records": len(traces),
        "blocks_per_trace": _dist([len(t.block_tokens) for t in traces]),
        "block_tokens": _dist(blocks),
        "summary_tokens": _dist(summaries),
        "compression_ratio": _ratio(sum(blocks), sum(summaries)),
        "response_tokens": _dist([t.response_tokens for t in traces]),
        "peak_kv_tokens": {"causal": _dist(pc), "memento": _dist(pm)},
        "peak_kv_reduction": _ratio(float(np.mean(pc)) if pc else 0, float(np.mean(pm)) if pm else 0),
        "kv_auc_reduction": _ratio(sum(t.auc_causal for t in traces), sum(t.auc_memento for t in traces)),
    }
    if traces and traces[0].peak_bytes_causal:
        out["peak_kv_gb"] = {
            "causal": _dist([t.peak_bytes_causal / 1e9 for t in traces]),
            "memento": _dist([t.peak_bytes_memento / 1e9 for t in traces]),
        }
    return out


@dataclass
class DatasetStats:
    """Everything ``memento-data stats`` prints."""

    source: str
    overall: dict[str, Any]
    by_domain: dict[str, dict[str, Any]]
    packing: PackingStats | None
    validation: ValidationReport
    geometry: KVGeometry | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        geo = None
        if self.geometry is not None:
            g = self.geometry
            geo = {
                "name": g.name,
                "layers": g.layers,
                "kv_heads": g.kv_heads,
                "head_dim": g.head_dim,
                "sliding_layers": g.sliding_layers,
                "sliding_window": g.sliding_window,
                "dtype_bytes": g.dtype_bytes,
                "note": g.note,
            }
        return {
            "source": self.source,
            "overall": self.overall,
            "by_domain": self.by_domain,
            "packing": None if self.packing is None else self.packing.to_dict(),
            "validation": self.validation.to_dict(),
            "model": geo,
            **self.extra,
        }

    def format(self) -> str:
        groups = [("all", self.overall)] + sorted(self.by_domain.items())
        names = [g for g, _ in groups]
        gb = self.geometry is not None and "peak_kv_gb" in self.overall

        def mpp(key: str):
            return lambda s: f"{s[key]['mean']:.0f}/{s[key]['p50']:.0f}/{s[key]['p90']:.0f}"

        lines = [f"memento-data stats: {self.source}", str(self.validation), ""]
        if not self.overall["records"]:
            lines.append("no valid records: nothing to measure")
            return "\n".join(lines)
        spec = [
            ("records", lambda s: str(s["records"])),
            (
                "blocks/trace mean (min-max)",
                lambda s: (
                    f"{s['blocks_per_trace']['mean']:.1f} "
                    f"({s['blocks_per_trace']['min']:.0f}-{s['blocks_per_trace']['max']:.0f})"
                ),
            ),
            ("block tokens mean/p50/p90", mpp("block_tokens")),
            ("summary tokens mean/p50/p90", mpp("summary_tokens")),
            ("compression block/summary", lambda s: f"{s['compression_ratio']:.2f}x"),
            ("response tokens mean/p50/p90", mpp("response_tokens")),
            ("peak KV tokens, causal (-1)", lambda s: f"{s['peak_kv_tokens']['causal']['mean']:.0f}"),
            ("peak KV tokens, memento (0)", lambda s: f"{s['peak_kv_tokens']['memento']['mean']:.0f}"),
            ("peak KV reduction (-1 vs 0)", lambda s: f"{s['peak_kv_reduction']:.2f}x"),
            ("KV AUC reduction (-1 vs 0)", lambda s: f"{s['kv_auc_reduction']:.2f}x"),
        ]
        if gb:
            g = self.geometry
            spec += [
                (f"peak KV GB causal, {g.name}", lambda s: f"{s['peak_kv_gb']['causal']['mean']:.3f}"),
                (f"peak KV GB memento, {g.name}", lambda s: f"{s['peak_kv_gb']['memento']['mean']:.3f}"),
            ]
        table = [[label] + [fn(st) for _, st in groups] for label, fn in spec]
        width0 = max(len(r[0]) for r in table) + 2
        width = max(len(c) for r in table for c in r[1:] + names) + 2
        lines.append(" " * width0 + "".join(f"{n:>{width}}" for n in names))
        lines += [f"{r[0]:<{width0}}" + "".join(f"{c:>{width}}" for c in r[1:]) for r in table]
        lines.append(
            "(peak KV: mean over traces of each trace's peak; GB at "
            f"{self.geometry.dtype_bytes if self.geometry else 2} bytes per value)"
        )
        if self.geometry is not None and self.geometry.note:
            lines.append(f"note: {self.geometry.note}")
        if self.packing is not None:
            lines += ["", str(self.packing)]
        return "\n".join(lines)


def dataset_stats(
    examples: Iterable[RenderedExample],
    renderer: Renderer,
    report: ValidationReport,
    *,
    source: str = "",
    pack_tokens: int | None = None,
    geometry: KVGeometry | None = None,
) -> DatasetStats:
    """Per-domain and overall statistics of kept examples, plus packing at ``pack_tokens``."""
    traces = [trace_stats(ex, renderer, geometry) for ex in examples]
    domains: dict[str, list[TraceStats]] = {}
    for t in traces:
        domains.setdefault(t.domain, []).append(t)
    packing = None
    if pack_tokens is not None and traces:
        lengths = [t.num_tokens for t in traces]
        bins = plan_bins(lengths, pack_tokens)
        packing = PackingStats(len(lengths), len(bins), sum(lengths), pack_tokens)
    return DatasetStats(
        source=source,
        overall=summarize(traces),
        by_domain={d: summarize(ts) for d, ts in domains.items()},
        packing=packing,
        validation=report,
        geometry=geometry,
    )
