"""Attention backends vs an einsum reference built from ``masking.dense_mask`` (docs/architecture.md §4).

Random packed metadata (document lengths, kill rows, GQA ratios, sliding windows) from hypothesis;
``sdpa`` and ``segment`` must match forward and backward in float64, ``flex`` forward in float32;
``flash_attn`` runs only on a CUDA machine with flash-attn installed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memento_train.attention import MementoAttentionMeta, available_backends, memento_attention
from memento_train.masking import dense_mask

TOL64 = 1e-11
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def packed_batches(draw, max_docs=4, max_len=20):
    """(cu_seqlens, global kill rows, Hkv, GQA ratio, head dim, window); every k < kill_row[k] <= doc end."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_docs).filter(lambda ls: sum(ls) > 0))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    kill = []
    for s, e in zip(cu[:-1], cu[1:]):
        for k in range(s, e):
            # Half the keys are never evicted (kill_row = document end); others die at a random later row.
            kill.append(e if draw(st.booleans()) else draw(st.integers(k + 1, e)))
    hkv = draw(st.sampled_from([1, 2]))
    ratio = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))
    window = draw(st.one_of(st.none(), st.integers(1, 10)))
    return cu, np.asarray(kill, dtype=np.int64), hkv, ratio, head_dim, window


def _qkv(n, hkv, ratio, head_dim, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hkv * ratio, head_dim, generator=g, dtype=dtype)
    k = torch.randn(n, hkv, head_dim, generator=g, dtype=dtype)
    v = torch.randn(n, hkv, head_dim, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def einsum_reference(q, k, v, cu, kill, window, scale):
    """softmax(q k^T * scale, masked by dense_mask) v, GQA by repeating key/value heads."""
    mask = torch.from_numpy(dense_mask(kill, cu, window=window))
    ratio = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@SETTINGS
@given(batch=packed_batches(), seed=st.integers(0, 2**16))
def test_sdpa_and_segment_match_dense_reference_forward_and_backward(batch, seed):
    cu, kill, hkv, ratio, head_dim, window = batch
    meta = MementoAttentionMeta.from_packed(cu, kill)
    n = int(cu[-1])
    scale = head_dim**-0.5
    q, k, v = _qkv(n, hkv, ratio, head_dim, seed=seed, grad=True)
    ref = einsum_reference(q, k, v, cu, kill, window, scale)
    upstream = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed + 1))
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    for backend in ("sdpa", "segment"):
        out = memento_attention(q, k, v, meta, scale=scale, window=window, backend=backend)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < TOL64, backend
        grads = torch.autograd.grad(out, (q, k, v), upstream)
        for name, g, rg in zip("qkv", grads, ref_grads):
            assert (g - rg).abs().max().item() < TOL64, f"{backend} d{name}"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=packed_batches(max_docs=3, max_len=16), seed=st.integers(0, 2**16))
def test_flex_forward_matches_dense_reference_float32(batch, seed):
    cu, kill, hkv, ratio, head_dim, window = batch
    meta = MementoAttentionMeta.from_packed(cu, kill)
    q, k, v = _qkv(int(cu[-1]), hkv, ratio, head_dim, dtype=torch.float32, seed=seed)
    ref = einsum_reference(q.double(), k.double(), v.double(), cu, kill, window, head_dim**-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unoptimised
        out = memento_attention(q, k, v, meta, scale=head_dim**-0.5, window=window, backend="flex")
    assert (out.double() - ref).abs().max().item() < 1e-5


def _evicting_meta(n: int) -> MementoAttentionMeta:
    """Two documents of about n/2 tokens whose middle third is evicted two thirds of the way in."""
    docs = []
    for length in (n // 2, n - n // 2):
        kill = np.full(length, length)
        kill[length // 3 : length // 2] = 2 * length // 3
        docs.append(kill)
    return MementoAttentionMeta.from_documents(docs)


@pytest.mark.slow  # compiles flex and the block-mask builder once (~20 s on 2 cores)
def test_compiled_flex_does_not_recompile_when_the_packed_length_changes(monkeypatch):
    """Micro-batches differ in length; a static compile recompiled per length (and past Dynamo's
    recompile limit fell back to unfused flex, which materialises the dense scores)."""
    from torch._dynamo.utils import counters

    from memento_train.attention import flex

    monkeypatch.setattr(flex, "FLEX_COMPILE", True)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for n in (300, 517, 700):
        meta = _evicting_meta(n)
        q, k, v = _qkv(n, 2, 2, 16, dtype=torch.float32, seed=n)
        out = memento_attention(q, k, v, meta, backend="flex")
        ref = memento_attention(q.double(), k.double(), v.double(), meta, backend="segment")
        assert (out.double() - ref).abs().max().item() < 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3, f"graphs compiled after each length: {graphs}"


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while ``fn`` runs (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = ("[memory]", "aten::empty", "aten::empty_strided", "aten::empty_like")
    return max((e.cpu_memory_usage for e in prof.events() if e.name in allocations), default=0)


@pytest.mark.slow  # compiles the block-mask builder (~10 s on 2 cores)
def test_compiled_block_mask_is_built_without_the_dense_mask(monkeypatch):
    """Eager ``create_block_mask`` evaluates the mask over all T x T pairs (an int64 T x T tensor:
    8 GiB at 32K tokens); the compiled builder reduces per tile as it evaluates."""
    from memento_train.attention import flex

    n = 4096
    assert _largest_allocation(lambda: flex.block_mask_for(_evicting_meta(n), None)) >= n * n  # eager
    monkeypatch.setattr(flex, "FLEX_COMPILE", True)
    flex.block_mask_for(_evicting_meta(256), None)  # compile outside the measurement
    meta = _evicting_meta(n)
    largest = _largest_allocation(lambda: flex.block_mask_for(meta, None))
    assert largest < n * n // 64, f"largest allocation {largest} B; a dense boolean mask is {n * n} B"
    # Same tiles as the eager builder.
    eager = torch.nn.attention.flex_attention.create_block_mask(
        flex.memento_mask_mod(meta.doc_ids(), meta.kill_row.long(), None), None, None, n, n, device="cpu"
    )
    compiled = meta._cache[("flex_block_mask", None)]
    assert torch.equal(compiled.kv_num_blocks, eager.kv_num_blocks)
    assert torch.equal(compiled.to_dense(), eager.to_dense())


def test_flex_backward_on_cpu_raises_a_clear_error():
    meta = MementoAttentionMeta.from_documents([[2, 3, 3]])
    q, k, v = _qkv(3, 1, 2, 8, dtype=torch.float32, grad=True)
    with pytest.raises(RuntimeError, match="no CPU backward.*segment"):
        memento_attention(q, k, v, meta, backend="flex")


@pytest.mark.gpu
@pytest.mark.skipif(
    available_backends()["flash_attn"] is not None,
    reason=f"flash_attn backend unavailable: {available_backends()['flash_attn']}",
)
def test_flash_attn_matches_sdpa_bf16():
    torch.manual_seed(0)
    lengths = [37, 1, 130, 64]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(0)
    kill = np.concatenate(
        [
            np.where(rng.random(e - s) < 0.5, e, rng.integers(np.arange(s, e) + 1, e + 1))
            for s, e in zip(cu[:-1], cu[1:])
        ]
    )
    meta = MementoAttentionMeta.from_packed(cu, kill, device="cuda")
    n = int(cu[-1])
    q = torch.randn(n, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16)
    ref = memento_attention(q.double(), k.double(), v.double(), meta, backend="sdpa")
    out = memento_attention(q, k, v, meta, backend="flash_attn")
    assert (out.double() - ref).abs().max().item() < 2e-2
    ref_w = memento_attention(
        q.double(), k.double(), v.double(), MementoAttentionMeta.causal(cu, device="cuda"), backend="sdpa", window=16
    )
    out_w = memento_attention(q, k, v, MementoAttentionMeta.causal(cu, device="cuda"), backend="flash_attn", window=16)
    assert (out_w.double() - ref_w).abs().max().item() < 2e-2


def test_flash_attn_unavailable_reason_on_cpu():
    reason = available_backends()["flash_attn"]
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    assert reason and "CUDA" in reason
    meta = MementoAttentionMeta.from_documents([[1]])
    q, k, v = _qkv(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="flash_attn.*unavailable"):
        memento_attention(q, k, v, meta, backend="flash_attn")


# -- metadata ----------------------------------------------------------------------------------
@SETTINGS
@given(batch=packed_batches())
def test_kept_pairs_equal_dense_mask_sum(batch):
    cu, kill, _, _, _, window = batch
    meta = MementoAttentionMeta.from_packed(cu, kill)
    assert meta.kept_pairs(window) == int(dense_mask(kill, cu, window=window).sum())
    assert meta.kept_pairs() == int(dense_mask(kill, cu).sum())
    doc_end = np.repeat(cu[1:], np.diff(cu))
    assert meta.causal_pairs(window) == int(dense_mask(doc_end, cu, window=window).sum())
    assert meta.has_eviction == bool((kill < doc_end).any())
    np.testing.assert_array_equal(meta.doc_ids().numpy(), np.repeat(np.arange(len(cu) - 1), np.diff(cu)))


@SETTINGS
@given(batch=packed_batches())
def test_interval_plan_partitions_rows_and_gathers_exactly_the_visible_keys(batch):
    cu, kill, *_ = batch
    meta = MementoAttentionMeta.from_packed(cu, kill)
    plan = meta.interval_plan()
    cu_q, cu_k = plan.cu_q.tolist(), plan.cu_k.tolist()
    n = int(cu[-1])
    # Intervals tile [0, n) in order, each inside one document, and are non-empty.
    assert cu_q[0] == 0 and cu_q[-1] == n and all(a < b for a, b in zip(cu_q, cu_q[1:]))
    doc = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    mask = dense_mask(kill, cu)
    for i in range(plan.num_intervals):
        a, b = cu_q[i], cu_q[i + 1]
        assert doc[a] == doc[b - 1]
        keys = plan.key_index[cu_k[i] : cu_k[i + 1]].numpy()
        assert keys[-(b - a) :].tolist() == list(range(a, b))  # the interval itself, last
        assert (keys[: len(keys) - (b - a)] < a).all()  # older keys, gathered
        for row in range(a, b):  # bottom-right causal over the gathered keys == the rule
            np.testing.assert_array_equal(np.sort(keys[keys <= row]), np.nonzero(mask[row])[0])
    assert plan.max_q == max(b - a for a, b in zip(cu_q, cu_q[1:]))
    assert plan.max_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))


@pytest.mark.parametrize(
    "cu,kill,match",
    [
        ([1, 3], [3, 3, 3], "start at 0"),
        ([0, 3, 2], [3, 3, 3], "non-decreasing"),
        ([[0, 3]], [3, 3, 3], "1-D"),
        ([0], [], "1-D"),
        ([0, 3], [3, 3], "kill_row has 2 entries"),
        ([0, 3], [3, 1, 3], r"kill_row\[1\]=1 <= 1"),
        ([0, 2, 4], [2, 2, 2, 4], r"kill_row\[2\]=2 <= 2"),
    ],
)
def test_meta_validation_errors(cu, kill, match):
    with pytest.raises(ValueError, match=match):
        MementoAttentionMeta.from_packed(cu, kill)


def test_meta_clamps_kill_rows_to_document_end_and_packs_documents():
    meta = MementoAttentionMeta.from_packed([0, 2, 5], [99, 2, 99, 4, 5])
    assert meta.kill_row.tolist() == [2, 2, 5, 4, 5]
    packed = MementoAttentionMeta.from_documents([[2, 2], [3, 2, 3]])
    assert packed.kill_row.tolist() == [2, 2, 5, 4, 5] and packed.cu_seqlens.tolist() == [0, 2, 5]
    assert packed.max_seqlen == 3 and packed.num_docs == 2


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(backend="nope"), ValueError, "unknown attention backend"),
        (dict(window=0), ValueError, "window must be positive"),
    ],
)
def test_memento_attention_argument_errors(kwargs, exc, match):
    meta = MementoAttentionMeta.from_documents([[2, 2]])
    q, k, v = _qkv(2, 1, 2, 4)
    with pytest.raises(exc, match=match):
        memento_attention(q, k, v, meta, **kwargs)


def test_memento_attention_shape_errors():
    meta = MementoAttentionMeta.from_documents([[2, 2]])
    q, k, v = _qkv(2, 2, 1, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        memento_attention(q[:, :1], k, v, meta)
    with pytest.raises(ValueError, match="metadata covers 2"):
        memento_attention(q[:1], k[:1], v[:1], meta)
    with pytest.raises(ValueError, match=r"packed \[T, H, D\]"):
        memento_attention(q[None], k, v, meta)


def _many_intervals_meta(blocks: int = 120, prompt: int = 64, block: int = 8) -> MementoAttentionMeta:
    """One document: a prompt that stays visible, then ``blocks`` blocks whose first half is evicted at
    the next block's start, so the document has ~``blocks`` intervals and every one gathers the prompt."""
    n = prompt + blocks * block
    kill = np.full(n, n)
    for b in range(blocks - 1):
        s = prompt + b * block
        kill[s : s + block // 2] = s + block
    return MementoAttentionMeta.from_documents([kill])


def test_flash_attn_sums_gradients_of_keys_shared_by_many_intervals_in_fp32(monkeypatch):
    """The prompt's keys are gathered by ~120 intervals, so their gradient is a sum of ~120 bf16 terms.
    On a GPU, ``index_select``'s backward adds them with bf16 atomics; the backend must add in fp32.

    Real backend code path on CPU: ``import flash_attn`` gives a CPU varlen attention (fp32 inside,
    bf16 in and out, like the CUDA kernel) and ``index_add`` rounds after every row like CUDA's
    ``atomicAdd``. A plain ``index_select`` gather is measured the same way, to show what is fixed."""
    import cuda_emulation

    from memento_train.attention import flash, registry

    cuda_emulation.install_flash_attn(monkeypatch)
    monkeypatch.setitem(registry._AVAILABILITY, "flash_attn", lambda: None)
    meta = _many_intervals_meta()
    assert meta.interval_plan().num_intervals > 100
    n, prompt = meta.num_tokens, 64
    q, k, v = _qkv(n, 2, 2, 16, dtype=torch.bfloat16, seed=3, grad=True)
    upstream = torch.randn(n, 4, 16, generator=torch.Generator().manual_seed(4), dtype=torch.bfloat16)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(memento_attention(q64, k64, v64, meta, backend="sdpa"), (k64, v64), upstream.double())

    def relative_errors():
        with cuda_emulation.AtomicIndexAdd():
            grads = torch.autograd.grad(memento_attention(q, k, v, meta, backend="flash_attn"), (k, v), upstream)
        return [float((g[:prompt].double() - e[:prompt]).norm() / e[:prompt].norm()) for g, e in zip(grads, exact)]

    rounding = [
        float((e[:prompt].to(torch.bfloat16).double() - e[:prompt]).norm() / e[:prompt].norm()) for e in exact
    ]  # bf16's floor: the exact gradient rounded once
    for name, r, f in zip(("dk", "dv"), rounding, relative_errors()):
        assert f < 2 * r, f"{name}: relative error {f:.2e}, bf16 rounding alone {r:.2e}"
    monkeypatch.setattr(flash, "gather_rows", lambda x, index: x.index_select(0, index))
    for name, r, p in zip(("dk", "dv"), rounding, relative_errors()):
        assert p > 5 * r, f"{name}: a plain gather's bf16 atomics should show: {p:.2e} vs rounding {r:.2e}"
