"""The Triton memento kernel (backend ``triton``) against the ``sdpa`` reference, and its tile plan.

* Tile plan (pure PyTorch, always runs): a tile pair holding a kept pair is never skipped, a full
  tile really is all-visible, and a tile whose keys are dead for the whole query tile is skipped.
* Kernels on CPU: Triton's interpreter (``TRITON_INTERPRET=1``) must be set before Triton is
  imported, so all interpreter cases run in one subprocess (this file run as a script) and report
  their errors as JSON; float32, tiny shapes, 16-wide tiles. Skipped if Triton is not importable.
* Kernels on GPU (``-m gpu``): bf16/fp16, head dims 64 and 128, OpenMementos-shaped 8K–32K batches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memento_train.attention import MementoAttentionMeta, available_backends, memento_attention
from memento_train.kernels import build_tile_plan, triton_config
from memento_train.kernels.function import interpreting, parse_config
from memento_train.masking import BlockMaskingConfig, dense_mask, parse

HAVE_TRITON = importlib.util.find_spec("triton") is not None
SPECIAL = {
    "<|im_start|>": 1,
    "assistant": 2,
    "<|block_start|>": 10,
    "<|block_end|>": 11,
    "<|summary_start|>": 12,
    "<|summary_end|>": 13,
}


def mementos_meta(
    seed: int, total: int, *, doc_tokens: int, block=24, summary=6, keep_last_n_blocks=0, device=None
) -> MementoAttentionMeta:
    """Packed OpenMementos-like documents (prompt, blocks + summaries, answer), kill rows from the parser."""
    rng = np.random.default_rng(seed)

    def jitter(n):
        return max(1, int(n * rng.uniform(0.7, 1.3)))

    kill_rows, remaining = [], total
    while remaining > 0:
        budget = min(doc_tokens, remaining)
        ids = [1] + [100] * jitter(block // 4) + [1, 2]
        while True:
            unit = [10] + [100] * jitter(block) + [11, 12] + [100] * jitter(summary) + [13]
            if len(ids) + len(unit) + 3 > budget:
                break
            ids += unit
        ids = (ids + [100] * budget)[:budget]
        kill_rows.append(parse(ids, SPECIAL, BlockMaskingConfig(keep_last_n_blocks=keep_last_n_blocks)).kill_row)
        remaining -= budget
    return MementoAttentionMeta.from_documents(kill_rows, device=device)


def random_meta(seed: int, lengths) -> MementoAttentionMeta:
    """Arbitrary kill rows: half the keys never evicted, the rest die at a random later row."""
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    kill = [
        e if rng.random() < 0.5 else int(rng.integers(k + 1, e + 1))
        for s, e in zip(cu[:-1], cu[1:])
        for k in range(s, e)
    ]
    return MementoAttentionMeta.from_packed(cu, np.asarray(kill, dtype=np.int64))


# -- tile plan (pure PyTorch) --------------------------------------------------------------------
def _tile_truth(meta, plan, window):
    """Per tile pair: does it hold a kept pair, and is every (in-range) pair of it kept?"""
    mask = torch.from_numpy(dense_mask(meta.kill_row.numpy(), meta.cu_seqlens.numpy(), window=window))
    any_kept = torch.zeros(plan.num_q_tiles, plan.num_k_tiles, dtype=torch.bool)
    all_kept = torch.zeros_like(any_kept)
    for i, (q0, q1) in enumerate(zip(plan.q_start.tolist(), plan.q_end.tolist())):
        for j, (k0, k1) in enumerate(zip(plan.k_start.tolist(), plan.k_end.tolist())):
            block = mask[q0:q1, k0:k1]
            full_shape = (q1 - q0, k1 - k0) == (plan.block_m, plan.block_n)
            any_kept[i, j] = bool(block.any())
            all_kept[i, j] = full_shape and bool(block.all())
    return any_kept, all_kept


PLAN_CASES = [
    ("mementos", lambda: mementos_meta(0, 300, doc_tokens=130), 16, 16, None),
    ("mementos window", lambda: mementos_meta(1, 300, doc_tokens=130), 16, 32, 20),
    ("mementos keep 1", lambda: mementos_meta(2, 300, doc_tokens=300, keep_last_n_blocks=1), 32, 16, None),
    ("random kill rows", lambda: random_meta(3, [37, 1, 0, 70, 50, 16]), 16, 16, None),
    ("random kill rows window", lambda: random_meta(4, [64, 5, 90]), 16, 16, 7),
    ("causal wide window", lambda: MementoAttentionMeta.causal([0, 150, 300]), 16, 16, 45),  # full + windowed
]


@pytest.mark.parametrize("name,make,bm,bn,window", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_tile_plan_never_skips_a_tile_holding_a_kept_pair_and_full_tiles_are_all_visible(name, make, bm, bn, window):
    meta = make()
    plan = build_tile_plan(meta.cu_seqlens, meta.kill_row, bm, bn, window)
    any_kept, all_kept = _tile_truth(meta, plan, window)
    live = plan.pair_mask("live")
    assert not (any_kept & ~live).any(), "a tile with a kept pair was skipped"
    full = plan.pair_mask("full")
    assert not (full & ~all_kept).any(), "a tile computed without mask has a masked pair"
    assert not (full & plan.pair_mask("partial")).any()
    # The by-key lists hold exactly the same pairs (dK/dV walks the tiles the forward walks).
    for kind in ("partial", "full"):
        assert torch.equal(plan.pair_mask(kind, by="k"), plan.pair_mask(kind, by="q"))
    # Every tile appears once in the launch order.
    assert sorted(plan.q_order.tolist()) == list(range(plan.num_q_tiles))
    assert sorted(plan.k_order.tolist()) == list(range(plan.num_k_tiles))


def test_tile_plan_skips_tiles_whose_keys_are_dead_for_the_whole_query_tile():
    # One 64-token document; keys 0..15 die at row 20, keys 16..31 at row 48, the rest never.
    kill = [20] * 16 + [48] * 16 + [64] * 32
    meta = MementoAttentionMeta.from_packed([0, 64], kill)
    plan = build_tile_plan(meta.cu_seqlens, meta.kill_row, 16, 16)
    live = plan.pair_mask()
    assert live[1, 0] and not live[2, 0] and not live[3, 0]  # key tile 0 dead from query tile 2 on
    assert live[2, 1] and not live[3, 1]
    assert live[3, 2] and live[3, 3]
    assert plan.live_pairs == 7 and plan.causal_pairs == 10
    # The whole tile [32, 48) x [16, 32) is visible (rows < 48 = kill row): computed without a mask.
    assert plan.q_full_rows[plan.q_full_ptr[2] : plan.q_full_ptr[3]].tolist() == [16]
    # A sliding window of 8 also kills the tile one step below the diagonal... but not the diagonal.
    windowed = build_tile_plan(meta.cu_seqlens, meta.kill_row, 16, 16, window=8).pair_mask()
    assert windowed[3, 2] and windowed[3, 3] and not windowed[3, 1]


def test_tile_plan_never_pairs_tiles_of_different_documents():
    meta = MementoAttentionMeta.causal([0, 20, 21, 60])
    plan = build_tile_plan(meta.cu_seqlens, meta.kill_row, 16, 16)
    doc_of = lambda start: int(torch.searchsorted(meta.cu_seqlens, start, right=True)) - 1  # noqa: E731
    live = plan.pair_mask()
    for i, j in live.nonzero().tolist():
        assert doc_of(plan.q_start[i]) == doc_of(plan.k_start[j])
    assert plan.q_start.tolist() == [0, 16, 20, 21, 37, 53] and plan.q_end.tolist() == [16, 20, 21, 37, 53, 60]


def test_tile_plan_on_an_openmementos_batch_visits_well_under_the_causal_tiles():
    # Two ~8K-token traces of ~1,150-token blocks and ~190-token mementos: about a third of the
    # causal pairs survive, and 128x64 tiles cost only a few points of extra (partial-tile) work.
    meta = mementos_meta(0, 16384, doc_tokens=8192, block=1150, summary=190)
    plan = build_tile_plan(meta.cu_seqlens, meta.kill_row, 128, 64)
    kept = meta.kept_pairs() / meta.causal_pairs()
    assert kept < 0.4
    assert plan.live_pairs / plan.causal_pairs < kept + 0.1


# -- registration and errors (no Triton import needed) -------------------------------------------
def test_triton_backend_is_registered_without_importing_triton():
    code = (
        "import sys, memento_train, memento_train.attention as a; "
        "r = a.available_backends(); assert 'triton' in r, r; "
        "assert 'triton' not in sys.modules, 'triton imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.skipif(
    torch.cuda.is_available() or interpreting() or not HAVE_TRITON,
    reason="checks the CPU refusal (needs triton installed, no CUDA, no interpreter)",
)
def test_triton_backend_on_cpu_refuses_with_a_clear_reason():
    assert "needs a CUDA GPU" in available_backends()["triton"]
    meta = MementoAttentionMeta.from_documents([[2, 2]])
    q = torch.randn(2, 2, 16)
    with pytest.raises(RuntimeError, match="triton.*unavailable.*CUDA GPU.*TRITON_INTERPRET"):
        memento_attention(q, q[:, :1], q[:, :1], meta, backend="triton")


def test_triton_config_strings_parse_and_bad_ones_are_rejected():
    cfg = parse_config("fwd=64x32:w8:s2,dkdv=16x128", triton_config(64, torch.device("cpu")))
    assert (cfg.fwd.block_m, cfg.fwd.block_n, cfg.fwd.num_warps, cfg.fwd.num_stages) == (64, 32, 8, 2)
    assert (cfg.dkdv.block_m, cfg.dkdv.block_n) == (16, 128)
    with pytest.raises(ValueError, match="bad triton config"):
        parse_config("fwd=64", cfg)
    with pytest.raises(ValueError, match="powers of two"):
        parse_config("dq=48x16", cfg)


def test_a_config_string_override_changes_only_the_named_kernel_of_each_head_dims_defaults():
    from memento_train.kernels import set_triton_config
    from memento_train.kernels.function import GPU_CONFIGS

    cuda = torch.device("cuda")  # only selects the GPU defaults; nothing runs
    try:
        set_triton_config("dkdv=32x128:w4")
        for d in (64, 128):
            cfg = triton_config(d, cuda)
            assert (cfg.fwd, cfg.dq) == (GPU_CONFIGS[d].fwd, GPU_CONFIGS[d].dq)
            assert (cfg.dkdv.block_m, cfg.dkdv.block_n, cfg.dkdv.num_warps) == (32, 128, 4)
        with pytest.raises(ValueError, match="bad triton config"):
            set_triton_config("dkdv=32")
        assert triton_config(64, cuda).dkdv.block_n == 128  # a rejected string leaves the override as it was
    finally:
        set_triton_config(None)
    assert triton_config(64, cuda) == GPU_CONFIGS[64]


# -- kernels in Triton's CPU interpreter ----------------------------------------------------------
def interpreter_cases():
    """(name, meta, kv heads, q heads per kv head, head dim, window, non-contiguous q/k/v)."""
    return [
        ("mementos gqa2 d16", mementos_meta(0, 170, doc_tokens=90), 2, 2, 16, None, False),
        ("mementos gqa2 d32 window", mementos_meta(1, 170, doc_tokens=90), 2, 2, 32, 20, False),
        ("mementos gqa2 d64", mementos_meta(2, 120, doc_tokens=120), 1, 2, 64, None, False),
        (
            "mementos keep-1 gqa3 d16",
            mementos_meta(3, 150, doc_tokens=150, keep_last_n_blocks=1),
            1,
            3,
            16,
            None,
            False,
        ),
        ("random kill rows mha d16 window", random_meta(4, [37, 1, 0, 70, 50]), 2, 1, 16, 7, False),
        ("causal gqa2 d16 strided", MementoAttentionMeta.causal([0, 45, 100]), 2, 2, 16, None, True),
    ]


def _run_interpreter_cases() -> dict:
    """Runs in the subprocess (TRITON_INTERPRET=1): max abs error of out/dq/dk/dv vs float64 sdpa."""
    results = {}
    for name, meta, hkv, group, d, window, strided in interpreter_cases():
        g = torch.Generator().manual_seed(0)
        n = meta.num_tokens
        if strided:  # [H, T, D] storage viewed as [T, H, D]: row stride != H * D
            q, k, v = (torch.randn(h, n, d, generator=g).transpose(0, 1) for h in (hkv * group, hkv, hkv))
        else:
            q, k, v = (torch.randn(n, h, d, generator=g) for h in (hkv * group, hkv, hkv))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        upstream = torch.randn(n, hkv * group, d, generator=g)
        out = memento_attention(q, k, v, meta, window=window, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), upstream)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = memento_attention(q64, k64, v64, meta, window=window, backend="sdpa")
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), upstream.double())
        errs = {"out": (out.double() - ref).abs().max().item()}
        errs.update({f"d{x}": (a.double() - b).abs().max().item() for x, a, b in zip("qkv", grads, ref_grads)})
        results[name] = errs
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAVE_TRITON:
        pytest.skip("triton is not importable: pip install 'memento-train[test]'")
    root = str(Path(__file__).resolve().parents[1])  # import this checkout, as the parent process does
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreter-cases"],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in interpreter_cases()])
def test_triton_forward_and_gradients_match_sdpa_in_the_interpreter(interpreter_results, name):
    errs = interpreter_results[name]
    assert max(errs.values()) < 1e-4, errs


# -- real GPU compilation, without a GPU ----------------------------------------------------------
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable: pip install 'memento-train[test]'")
@pytest.mark.parametrize("window", [False, True], ids=["causal", "window"])
def test_kernels_compile_for_h100_with_the_default_configs(window):
    """The interpreter is lenient about types; lower the real kernels to an sm_90 cubin (bundled ptxas)."""
    code = (
        "import json; from memento_train.kernels.aot import compile_kernels; "
        f"print(json.dumps(compile_kernels(128, dtype='bf16', arch=90, window={window})))"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(info) == {"fwd", "dq", "dkdv"}
    for name, kernel in info.items():
        assert kernel["shared_bytes"] <= 227 * 1024, (name, kernel)  # H100's per-block shared memory


# -- kernels on a CUDA GPU -----------------------------------------------------------------------
def _gpu_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return available_backends()["triton"]


GPU_CASES = [  # (tokens, q heads, kv heads, head dim, dtype, window)
    (32768, 16, 4, 128, torch.bfloat16, None),
    (16384, 16, 4, 128, torch.float16, None),
    (8192, 8, 8, 64, torch.bfloat16, None),
    (8192, 16, 4, 64, torch.bfloat16, 4096),
]


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=f"triton on GPU unavailable: {_gpu_reason()}")
@pytest.mark.parametrize("tokens,hq,hkv,d,dtype,window", GPU_CASES)
def test_triton_matches_sdpa_on_gpu_at_full_size(tokens, hq, hkv, d, dtype, window):
    meta = mementos_meta(0, tokens, doc_tokens=12_000, block=1150, summary=190, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(tokens, h, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for h in (hq, hkv, hkv)
    )
    upstream = torch.randn(tokens, hq, d, device="cuda", dtype=dtype, generator=g)
    out = memento_attention(q, k, v, meta, window=window, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = memento_attention(q32, k32, v32, meta, window=window, backend="sdpa")
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), upstream.float())
    assert (out.float() - ref).abs().max().item() < 2e-2
    for name, a, b in zip("qkv", grads, ref_grads):  # 16-bit gradients: compare relative norms
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 1e-2, f"d{name} relative error {rel:.2e}"


if __name__ == "__main__" and "--interpreter-cases" in sys.argv:
    if not interpreting():
        sys.exit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    print(json.dumps(_run_interpreter_cases()))
