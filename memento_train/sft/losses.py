"""The SFT objective: next-token cross-entropy summed over loss tokens, divided by the global count.

The loss comes from the fused, chunked LM head (:mod:`memento_train.models.lm_head`): engines run the model
with a :class:`~memento_train.engines.head_stats.TokenStatsFn` and the head returns per-token
log-probs, so neither the ``[T, vocab]`` logits nor an fp32 log-softmax of them is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memento_train.data.pack import IGNORE_INDEX
from memento_train.engines.head_stats import TokenStats, TokenStatsFn
from memento_train.models.lm_head import DEFAULT_CHUNK_ROWS


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Sum of ``cross_entropy(logits[t], labels[t])`` over positions whose label is not ignored, from
    logits already computed (evaluation of a model outside an engine). Chunked fp32; the training loss
    does not go through here (see :func:`sft_loss_fn`). fp64 logits stay fp64."""
    work = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
    total = logits.new_zeros((), dtype=work)
    for lo in range(0, logits.shape[0], chunk_rows):
        lab = labels[lo : lo + chunk_rows]
        if bool((lab != IGNORE_INDEX).any()):
            total = total + F.cross_entropy(
                logits[lo : lo + chunk_rows].to(work), lab, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        elif logits.requires_grad:
            total = total + logits[lo : lo + chunk_rows].sum() * 0.0  # keep the graph connected
    return total


def sft_loss_fn(global_loss_tokens: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> TokenStatsFn:
    """An engine loss for one step: the micro-batch's token-loss sum / loss tokens of the whole global
    batch (all ranks, all micro-batches), from the fused LM head. Positions with label ``-100`` (or
    ``loss_mask`` 0 in ``mb.extras``) carry no loss."""
    denom = float(max(1, global_loss_tokens))

    def loss_fn(stats: TokenStats, mb) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum = -stats.logprobs.sum()
        return loss_sum / denom, {"loss_sum": float(loss_sum.detach())}

    return TokenStatsFn(loss_fn, chunk_rows=chunk_rows)
