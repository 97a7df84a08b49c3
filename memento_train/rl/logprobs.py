"""Token log-probs and entropies from logits ``[T, V]`` and per-document shifted labels ``[T]``.

Labels follow :mod:`memento_train.data.pack`: ``labels[t]`` is the token predicted at position ``t``
(already shifted per document), ``-100`` where there is no loss. So with ``z = logits / temperature``:

- ``logp[t] = z[t, labels[t]] - logsumexp(z[t])``
- ``H[t] = logsumexp(z[t]) - Σ_v softmax(z[t])_v · z[t, v]`` (the entropy of the full distribution)

and both are 0 where ``labels[t] == -100``. ``temperature`` must be the rollout sampling temperature,
so that trainer and rollout log-probs describe the same distribution (``log_softmax(logits / T)``, see
:mod:`memento_train.generation.sampling`).

Memory. A plain ``log_softmax(logits.float())`` keeps a full fp32 ``[T, V]`` copy alive for backward
(≈ 5 GB for 8k tokens of a 152k vocab). :class:`_LogprobEntropy` instead works on ``chunk_size`` rows
at a time in fp32, saves only ``logsumexp`` and ``H`` per row, and recomputes each chunk's softmax in
backward:

- ``∂logp[t]/∂z[t, v] = 1[v = labels[t]] - p_v``
- ``∂H[t]/∂z[t, v] = -p_v · (log p_v + H[t])``

Rows without a label are skipped entirely (prompt tokens cost nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Same value as memento_train.data.pack.IGNORE_INDEX; not imported from there because
# memento_train.data pulls in `datasets` at import time.
IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 512


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    # fp64 stays fp64 (gradcheck in tests); everything else is computed in fp32.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunk_stats(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, H)`` of one chunk of scaled logits ``z`` ``[n, V]`` (``z`` is overwritten)."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, labels[:, None]).squeeze(1) - lse
    p = torch.exp(z - lse[:, None])
    entropy = lse - p.mul_(z).sum(-1)  # in place: one [n, V] temporary besides z
    return logp, lse, entropy


class _LogprobEntropy(torch.autograd.Function):
    """Chunked fp32 ``(logp, H)`` of the labelled rows with a recomputing backward (module docstring)."""

    @staticmethod
    def forward(ctx, logits, rows, row_labels, temperature, chunk_size):  # noqa: D401 - autograd API
        work = _work_dtype(logits)
        n_tok = logits.shape[0]
        logp = torch.zeros(n_tok, dtype=work, device=logits.device)
        entropy = torch.zeros(n_tok, dtype=work, device=logits.device)
        lse = torch.empty(rows.shape[0], dtype=work, device=logits.device)
        for s in range(0, rows.shape[0], chunk_size):
            r = rows[s : s + chunk_size]
            z = logits.index_select(0, r).to(work) / temperature
            lp, chunk_lse, h = _chunk_stats(z, row_labels[s : s + chunk_size])
            logp[r], entropy[r], lse[s : s + chunk_size] = lp, h, chunk_lse
        ctx.save_for_backward(logits, rows, row_labels, lse, entropy[rows])
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        # ∂/∂z_v = g_lp · (1[v = label] - p_v) - g_H · p_v · (log p_v + H)
        #        = -p_v · (g_lp + g_H · (log p_v + H)) + g_lp · 1[v = label]
        logits, rows, row_labels, lse, row_entropy = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk_size
        grad_logits = torch.zeros_like(logits)
        if grad_logp is None and grad_entropy is None:
            return grad_logits, None, None, None, None
        work = _work_dtype(logits)
        for s in range(0, rows.shape[0], chunk):
            r, lab = rows[s : s + chunk], row_labels[s : s + chunk]
            glp = (
                grad_logp[r].to(work)
                if grad_logp is not None
                else torch.zeros(r.shape[0], dtype=work, device=logits.device)
            )
            log_p = (logits.index_select(0, r).to(work) / t).sub_(lse[s : s + chunk, None])
            p = torch.exp(log_p)
            if grad_entropy is not None:
                gh = grad_entropy[r].to(work)[:, None]
                g = log_p.add_(row_entropy[s : s + chunk, None]).mul_(gh).add_(glp[:, None]).mul_(p).neg_()
            else:
                g = p.mul_(-glp[:, None])
            g.scatter_add_(1, lab[:, None], glp[:, None])
            grad_logits.index_copy_(0, r, g.div_(t).to(logits.dtype))
        return grad_logits, None, None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, H)``, each ``[T]`` fp32 (fp64 for fp64 logits), 0 where ``labels == -100``.

    ``logp[t] = log_softmax(logits[t] / temperature)[labels[t]]``; ``H[t]`` the entropy of that
    distribution. Differentiable in ``logits`` through both outputs, with bounded extra memory.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [T, V] and labels [T], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.to(logits.device)
    rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    return _LogprobEntropy.apply(logits, rows, labels[rows], float(temperature), int(max(1, chunk_size)))


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[labels]`` per position, ``[T]``; 0 where ``labels == -100``."""
    return token_logprobs_and_entropy(logits, labels, temperature=temperature, chunk_size=chunk_size)[0]


def make_logprob_fn(
    *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE, labels_key: str = "labels"
) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """``fn(logits, mb) -> logp [T]`` for ``engine.forward_only``: old / reference log-probs.

    Reads the shifted labels from ``mb.extras[labels_key]``; returns detached fp32 log-probs on the
    logits' device (0 where there is no label).
    """

    def logprob_fn(logits: torch.Tensor, mb) -> torch.Tensor:
        return token_logprobs(logits, mb.extras[labels_key], temperature=temperature, chunk_size=chunk_size).detach()

    return logprob_fn


__all__ = ["IGNORE_INDEX", "make_logprob_fn", "token_logprobs", "token_logprobs_and_entropy"]
