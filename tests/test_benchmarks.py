"""The benchmark scripts still run and report what they claim (tiny sizes, CPU; timings not judged)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_attention_benchmark_tiles_only_reports_every_kernel_for_every_size():
    out = _bench("--tiles-only", "--tokens", "4096", "8192", "--head-dim", "64", "--triton-config", "dkdv=32x64")
    sizes = re.findall(r"(\d+) tokens: the mask keeps ([\d.]+)% of the causal pairs", out)
    assert [n for n, _ in sizes] == ["4096", "8192"]
    rows = re.findall(
        r"(fwd|dq|dkdv)\s+(\d+)x(\d+)\s+live\s+([\d.]+)%\s+full\s+([\d.]+)%\s+partial\s+([\d.]+)%"
        r"\s+bound ([\d.]+)x",
        out,
    )
    assert len(rows) == 2 * 2 * 3  # sizes x (default, extra config) x kernels
    assert ("dkdv", "32", "64") in {r[:3] for r in rows}  # the extra config was planned
    for name, _, _, live, full, partial, bound in rows:
        live, full, partial, bound = map(float, (live, full, partial, bound))
        assert 0 < full <= live < 100 and abs(live - full - partial) < 0.2, (name, live, full, partial)
        assert abs(bound - 100 / live) < 0.02 and bound > 1


def test_attention_benchmark_on_cpu_times_memento_and_causal_rows_into_json(tmp_path):
    out_json = tmp_path / "bench.json"
    out = _bench(
        "--device",
        "cpu",
        "--tokens",
        "3072",
        "--modes",
        "fwd",
        "--backends",
        "segment",
        "causal segment",
        "triton",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out_json),
    )
    rows = {r["backend"]: r for r in json.loads(out_json.read_text())}
    assert set(rows) == {"segment", "causal segment"}, rows  # triton is skipped on CPU, with its reason
    for r in rows.values():
        assert r["ms"] > 0 and r["tokens"] == 3072 and 0 < r["kept"] <= 1, r
    assert rows["causal segment"]["kept"] == 1.0 and rows["segment"]["kept"] < 1.0
    assert re.search(r"triton\s+skipped: ", out) and "memento mask keeps" in out
