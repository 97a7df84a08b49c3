"""Memento attention inside stock HF models (Qwen3, Phi-3, Olmo 3 with sliding + full layers).

* packed batch without eviction == each document run alone with stock ``sdpa`` attention;
* packed batch with eviction == each document run alone with stock ``sdpa`` / ``eager`` attention
  and an explicit 4-D mask built from ``masking.dense_mask`` (per layer type for Olmo 3);
* backward: finite gradients, identical between the ``segment`` and ``sdpa`` backends;
* clear errors for a missing ``memento_meta`` and for batch size > 1.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from memento_train.attention import MementoAttentionMeta, attn_implementation
from memento_train.masking import dense_mask

FAMILIES = ["qwen3", "phi3", "olmo3"]
TOL64 = 1e-10
LENGTHS = [23, 9, 31]  # longer than the Olmo 3 test window (8), so sliding layers really slide


def _docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g) for n in LENGTHS]


def _kill_rows(seed=0):
    """Random valid per-document kill rows: about half the keys evicted at a random later row."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        k = np.arange(n)
        evict = rng.random(n) < 0.5
        out.append(np.where(evict, rng.integers(k + 1, n + 1), n))
    return out


def _packed_forward(model, docs, meta, backend="segment", grad=False):
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    model.set_attn_implementation(attn_implementation(backend))
    try:
        with torch.set_grad_enabled(grad):
            return model(input_ids=ids, position_ids=pos, memento_meta=meta, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation("sdpa")


def _explicit(mask: np.ndarray, impl: str) -> torch.Tensor:
    """A 4-D ``[1, 1, L, L]`` mask: boolean for sdpa, additive float64 for eager."""
    visible = torch.from_numpy(mask)[None, None]
    if impl == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, make_tiny_lm):
    return make_tiny_lm(request.param, dtype=torch.float64)


def test_packed_without_eviction_equals_stock_per_document_sdpa(model):
    docs = _docs()
    meta = MementoAttentionMeta.causal(np.concatenate([[0], np.cumsum(LENGTHS)]))
    packed = _packed_forward(model, docs, meta).split(LENGTHS)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for d, got in zip(docs, packed):
            ref = model(input_ids=d[None], use_cache=False).logits[0]
            assert (got - ref).abs().max().item() < TOL64


# HF's eager attention takes its softmax in float32 even for float64 models, hence its looser bound.
@pytest.mark.parametrize("impl,tol", [("sdpa", TOL64), ("eager", 1e-6)])
def test_packed_with_eviction_equals_stock_attention_with_explicit_mask(model, impl, tol):
    docs, kill = _docs(1), _kill_rows(1)
    meta = MementoAttentionMeta.from_documents(kill)
    assert meta.has_eviction
    packed = _packed_forward(model, docs, meta).split(LENGTHS)
    causal_packed = _packed_forward(model, docs, MementoAttentionMeta.causal(meta.cu_seqlens)).split(LENGTHS)
    window = getattr(model.config, "sliding_window", None)
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            for d, kr, got, causal in zip(docs, kill, packed, causal_packed):
                full = _explicit(dense_mask(kr), impl)
                if "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
                    # Per layer type: HF passes an already-built mask mapping through unchanged.
                    mask = {"full_attention": full, "sliding_attention": _explicit(dense_mask(kr, window=window), impl)}
                else:
                    assert window is None  # one mask serves every layer
                    mask = full
                ref = model(input_ids=d[None], attention_mask=mask, use_cache=False).logits[0]
                assert (got - ref).abs().max().item() < tol
                assert (got - causal).abs().max().item() > 1e-4  # the eviction mattered
    finally:
        model.set_attn_implementation("sdpa")


def test_backward_segment_equals_sdpa_backend(model):
    docs, kill = _docs(2), _kill_rows(2)
    meta = MementoAttentionMeta.from_documents(kill)
    targets = torch.cat(docs).roll(-1)
    grads = {}
    for backend in ("segment", "sdpa"):
        model.zero_grad(set_to_none=True)
        logits = _packed_forward(model, docs, meta, backend, grad=True)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads["segment"].keys() == grads["sdpa"].keys()
    assert len(grads["segment"]) == len(list(model.parameters()))
    for name, g in grads["segment"].items():
        assert torch.isfinite(g).all(), name
        assert (g - grads["sdpa"][name]).abs().max().item() < TOL64, name


def test_auto_backend_is_segment_on_cpu(model):
    docs, kill = _docs(3), _kill_rows(3)
    meta = MementoAttentionMeta.from_documents(kill)
    auto = _packed_forward(model, docs, meta, "auto")
    seg = _packed_forward(model, docs, meta, "segment")
    assert torch.equal(auto, seg)


def test_missing_meta_is_a_clear_error(model):
    model.set_attn_implementation(attn_implementation("segment"))
    try:
        with pytest.raises(ValueError, match="needs the batch metadata.*memento_meta"):
            model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")


def test_batch_size_above_one_is_a_clear_error(model):
    meta = MementoAttentionMeta.causal([0, 3])
    model.set_attn_implementation(attn_implementation("segment"))
    try:
        with pytest.raises(ValueError, match="batch size 1, got 2"):
            model(input_ids=torch.tensor([[5, 6, 7], [5, 6, 7]]), memento_meta=meta, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")


def test_auto_backend_runs_olmo3_sliding_window_layers_with_eviction_on_cuda(make_tiny_lm, monkeypatch):
    """``attn_backend=auto`` on a GPU with flash-attn: sliding-window layers must not get ``flash_attn``,
    which cannot apply a window once keys are evicted (it raised NotImplementedError on Olmo 3).

    Simulated on CPU: tensors report ``is_cuda``, ``import flash_attn`` gives a CPU varlen attention
    (so the real ``flash_attn`` backend serves the full-attention layer) and flex runs eagerly."""
    import cuda_emulation

    from memento_train.attention import flex, registry

    model = make_tiny_lm("olmo3", dtype=torch.float32)
    docs, kill = _docs(2), _kill_rows(2)
    meta = MementoAttentionMeta.from_documents(kill)
    assert meta.has_eviction
    expected = _packed_forward(model, docs, meta, backend="segment")

    used = []
    for name in ("flash_attn", "flex"):
        monkeypatch.setitem(registry._BACKENDS, name, _recording(registry._BACKENDS[name], name, used))
    cuda_emulation.install_flash_attn(monkeypatch)
    monkeypatch.setitem(registry._AVAILABILITY, "flash_attn", lambda: None)
    monkeypatch.setattr(flex, "FLEX_COMPILE", False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unoptimised
        got = _packed_forward(model, docs, meta, backend="auto")
    monkeypatch.undo()

    windows = [model.config.sliding_window if t == "sliding_attention" else None for t in model.config.layer_types]
    assert used == [("flex" if w else "flash_attn", w) for w in windows]  # per layer type, in layer order
    assert (got - expected).abs().max().item() < 1e-4


def _recording(fn, name, log):
    def backend(q, k, v, meta, *, scale, window):
        log.append((name, window))
        return fn(q, k, v, meta, scale=scale, window=window)

    return backend
