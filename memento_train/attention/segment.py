"""``segment`` backend: the exact interval formulation in pure PyTorch (CPU and GPU, fwd and bwd).

Each interval between consecutive kill rows attends to its gathered still-visible older keys plus
itself with bottom-right causal alignment (see :class:`~.meta.IntervalPlan`). No ``T × T`` mask is
ever built: long intervals are processed in query chunks, so memory is O(chunk × visible keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memento_train.attention.meta import MementoAttentionMeta

QUERY_CHUNK = 512  # rows per SDPA call; bounds the score matrix to chunk × visible keys


def segment_attention(q, k, v, meta: MementoAttentionMeta, *, scale: float, window: int | None) -> torch.Tensor:
    plan = meta.interval_plan()
    cu_q, cu_k = plan.cu_q.tolist(), plan.cu_k.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for i in range(plan.num_intervals):
        a, b = cu_q[i], cu_q[i + 1]
        key_index = plan.key_index[cu_k[i] : cu_k[i + 1]]
        num_older = key_index.numel() - (b - a)
        ks, vs = k.index_select(0, key_index), v.index_select(0, key_index)
        for c0 in range(a, b, QUERY_CHUNK):
            c1 = min(c0 + QUERY_CHUNK, b)
            n_keys = num_older + (c1 - a)  # older keys + this interval's prefix up to the chunk end
            rows = torch.arange(c0, c1, device=q.device)[:, None]
            key_pos = key_index[:n_keys][None, :]
            mask = key_pos <= rows  # bottom-right causal within the interval; older keys all pass
            if window is not None:
                mask = mask & (rows - key_pos < window)
            outs.append(_attend(q[c0:c1], ks[:n_keys], vs[:n_keys], mask, scale, gqa))
    return torch.cat(outs, 0) if outs else torch.empty_like(q)


def _attend(q, k, v, mask, scale, gqa):
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=gqa,
    )
    return o[0].transpose(0, 1)
