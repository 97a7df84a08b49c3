"""``flex`` backend: PyTorch FlexAttention with a mask_mod over document ids and kill rows.

The block mask lets FlexAttention skip tiles whose keys are all evicted (or in another document).
It is built once per batch and window and cached on the metadata, so all layers share it.
Forward runs on CPU and GPU; torch has no CPU backward for FlexAttention, so CPU training uses
``segment``.

Compiled (the default on CUDA), both FlexAttention and the block-mask builder are compiled with
``dynamic=True``: packed micro-batches differ in length, and a static compile recompiled for every
length until Dynamo's recompile limit, after which flex falls back to its unfused path that
materialises the dense score matrix (~128 GiB at 32K tokens x 32 heads). Compiling
``create_block_mask`` fuses the mask evaluation into the per-tile reduction; eager, it evaluates the
mask over all ``T x T`` pairs first (an int64 ``T x T`` tensor: 8 GiB at 32K).
"""

from __future__ import annotations

import functools

import torch

from memento_train.attention.meta import MementoAttentionMeta

# None: compile on CUDA only (eager flex is a slow reference); benchmarks may force True on CPU.
FLEX_COMPILE: bool | None = None


def flex_unavailable_reason() -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - torch >= 2.5 has it
        return f"torch {torch.__version__} has no FlexAttention ({exc})"
    return None


def memento_mask_mod(doc_ids: torch.Tensor, kill_row: torch.Tensor, window: int | None):
    """The visibility predicate as a FlexAttention ``mask_mod``."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (doc_ids[q_idx] == doc_ids[kv_idx]) & (kv_idx <= q_idx) & (q_idx < kill_row[kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return mask_mod


def flex_compiles(device: torch.device) -> bool:
    """Whether flex (attention and block masks) runs compiled on ``device``."""
    return device.type == "cuda" if FLEX_COMPILE is None else FLEX_COMPILE


def block_mask_for(meta: MementoAttentionMeta, window: int | None):
    """FlexAttention ``BlockMask`` for this batch (cached per window); built by the compiled
    ``create_block_mask`` when flex compiles on the metadata's device (no dense ``T x T`` mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex_block_mask", window)
    if key not in meta._cache:
        device = meta.kill_row.device
        mask_mod = memento_mask_mod(meta.doc_ids(), meta.kill_row.long(), window)
        n = meta.num_tokens
        build = _compiled_block_mask() if flex_compiles(device) else create_block_mask
        meta._cache[key] = build(mask_mod, None, None, n, n, device=device)
    return meta._cache[key]


# dynamic=True: one graph for every packed length (see the module docstring).
@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


@functools.cache
def _compiled_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=True)


def flex_attention_backend(q, k, v, meta: MementoAttentionMeta, *, scale: float, window: int | None):
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "the flex backend has no CPU backward in this torch; train on CPU with backend 'segment' "
            "(exact, same mask) or run flex on a GPU"
        )
    fn = _compiled_flex() if flex_compiles(q.device) else flex_attention
    out = fn(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=block_mask_for(meta, window),
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)
