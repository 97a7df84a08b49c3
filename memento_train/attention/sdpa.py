"""``sdpa`` backend: dense boolean mask per document. The reference every other backend must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memento_train.attention.meta import MementoAttentionMeta


def dense_document_mask(kill_row: torch.Tensor, start: int, end: int, window: int | None) -> torch.Tensor:
    """``[L, L]`` visibility of one document from its slice of global kill rows."""
    pos = torch.arange(start, end, device=kill_row.device)
    q, k = pos[:, None], pos[None, :]
    mask = (k <= q) & (q < kill_row[start:end].long()[None, :])
    if window is not None:
        mask &= (q - k) < window
    return mask


def sdpa_attention(q, k, v, meta: MementoAttentionMeta, *, scale: float, window: int | None) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = meta.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        mask = dense_document_mask(meta.kill_row, s, e, window)
        out[s:e] = _sdpa(q[s:e], k[s:e], v[s:e], mask, scale)
    return out


def _sdpa(q, k, v, mask, scale):
    # [L, H, D] -> [1, H, L, D]; GQA handled by SDPA itself.
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return o[0].transpose(0, 1)
