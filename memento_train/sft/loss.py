"""The SFT objective: next-token cross-entropy summed over loss tokens, divided by the global count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memento_train.data.pack import IGNORE_INDEX
from memento_train.engines import MicroBatch

# Rows of logits upcast to fp32 at a time: a 32K x 152K fp32 copy would cost 20 GB at once.
CE_CHUNK_ROWS = 4096


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = CE_CHUNK_ROWS) -> torch.Tensor:
    """Sum of ``cross_entropy(logits[t], labels[t])`` over positions whose label is not ignored.

    ``labels`` are already shifted per document (see :mod:`memento_train.data.pack`). The loss is
    computed in fp32 chunk by chunk whatever the logits' dtype.
    """
    total = logits.new_zeros((), dtype=torch.float32)
    for lo in range(0, logits.shape[0], chunk_rows):
        lab = labels[lo : lo + chunk_rows]
        if bool((lab != IGNORE_INDEX).any()):
            total = total + F.cross_entropy(
                logits[lo : lo + chunk_rows].float(), lab, ignore_index=IGNORE_INDEX, reduction="sum"
            )
        elif logits.requires_grad:
            total = total + logits[lo : lo + chunk_rows].sum() * 0.0  # keep the graph connected
    return total


def sft_loss_fn(global_loss_tokens: int):
    """An engine ``loss_fn`` for one step: token loss sum / loss tokens of the whole global batch."""
    denom = float(max(1, global_loss_tokens))

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        loss_sum = token_loss_sum(logits, mb.extras["labels"])
        return loss_sum / denom, {"loss_sum": float(loss_sum.detach())}

    return loss_fn
