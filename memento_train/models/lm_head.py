"""The fused, chunked LM head: token log-probs (and entropies) from hidden states and the head weight.

A plain LM head followed by a cross-entropy materialises the logits ``[T, V]`` and keeps an fp32
``log_softmax`` of them for backward: ``T·V·4`` bytes, 19.9 GB at 32K tokens of Qwen3's 151,936-token
vocabulary (plus the bf16 logits and backward temporaries). Here the hidden states ``[T, H]`` and the
head weight ``[V, H]`` go in, and only per-token results come out. Rows are processed ``chunk_rows`` at
a time; each chunk's logits live only inside the chunk, and backward *recomputes* them. What is saved
for backward is the hidden states and the weight (which the plain head saves too) plus two floats per
labelled row, so saved memory is ``O(T·H)`` and the transient working set ``O(chunk_rows·V)``.

With ``z = (h · Wᵀ) / temperature`` and ``lse = logsumexp(z)``, for each row with a label ``y``:

- ``logp = z_y − lse`` and, optionally, ``H = lse − Σ_v p_v z_v`` (the entropy of the distribution);
- backward: ``∂/∂z_v = −p_v · (g_logp + g_H · (log p_v + H)) + g_logp · 1[v = y]``, then
  ``∂h = (∂z / temperature) · W`` and ``∂W = (∂z / temperature)ᵀ · h``.

Rows without a label (``-100``) cost nothing and get 0 and a zero gradient.

**Vocabulary parallel** (Megatron tensor parallelism): each rank holds a slice of the vocabulary
(:class:`VocabShard`: its rows of the padded head, the global id of its first row, how many of its rows
are real tokens). Per chunk, every rank reduces its slice to three numbers per row (local
``logsumexp``, the label's logit if this rank owns the label, local ``Σ p z``) and one all-gather
combines them; no rank ever holds logits of another rank's slice. The gradient of the hidden states is
summed over the group in backward (the hidden states are replicated across it).

Precision follows the plain path: the chunk's logits are computed in the operands' dtype (bf16 in
mixed precision), then the softmax in fp32 (fp64 for fp64 inputs, which the exactness tests use);
the weight gradient is accumulated over chunks in fp32. Working set per chunk: the fp32 logits and
their exponentials (plus the low-precision matmul output), and for the entropy's gradient one more
fp32 ``[chunk, V]`` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100  # as memento_train.data.pack (not imported: that package pulls in `datasets`)
# Rows per chunk: at Qwen3's 152K vocabulary one fp32 [chunk, V] buffer is 1.2 GB.
DEFAULT_CHUNK_ROWS = 2048


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a vocabulary-parallel LM head.

    Attributes:
        group: the process group the vocabulary is split over (tensor parallel).
        start: global token id of the local weight's row 0.
        valid: how many local rows are real tokens (the rest pads the vocabulary to a multiple).
    """

    group: dist.ProcessGroup | None
    start: int
    valid: int


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, work: torch.dtype) -> torch.Tensor:
    z = F.linear(h, w).to(work)  # computed in the operands' dtype, like the plain head
    return z.div_(temperature) if temperature != 1.0 else z


class _FusedHeadTokenStats(torch.autograd.Function):
    """``(logp [T], entropy [T])`` of the labelled rows; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, row_labels, temperature, chunk, with_entropy, shard):  # noqa: D401
        work = _work_dtype(hidden)
        n_tok, n = hidden.shape[0], rows.shape[0]
        start, valid = (shard.start, shard.valid) if shard is not None else (0, weight.shape[0])
        group = shard.group if shard is not None else None
        w = weight[:valid]
        logp = hidden.new_zeros(n_tok, dtype=work)
        entropy = hidden.new_zeros(n_tok, dtype=work)
        lse = hidden.new_empty(n, dtype=work)
        row_entropy = hidden.new_zeros(n, dtype=work)
        for s in range(0, n, chunk):
            r, lab = rows[s : s + chunk], row_labels[s : s + chunk] - start
            z = _chunk_logits(hidden.index_select(0, r), w, temperature, work)
            own = (lab >= 0) & (lab < valid)
            if valid:
                local_lse = torch.logsumexp(z, dim=-1)
                target = torch.where(own, z.gather(1, lab.clamp(0, valid - 1)[:, None]).squeeze(1), 0.0)
                # Σ_v softmax(z)_v · z_v of this slice (the entropy's second term)
                local_pz = (
                    torch.exp(z - local_lse[:, None]).mul_(z).sum(-1) if with_entropy else torch.zeros_like(local_lse)
                )
            else:  # a slice of padding only
                local_lse = torch.full_like(lab, float("-inf"), dtype=work)
                target = torch.zeros_like(local_lse)
                local_pz = torch.zeros_like(local_lse)
            if group is not None:
                local_lse, target, local_pz = _combine_over_vocab(local_lse, target, local_pz, group)
            lse[s : s + chunk] = local_lse
            logp[r] = target - local_lse
            if with_entropy:
                row_entropy[s : s + chunk] = local_lse - local_pz
        entropy[rows] = row_entropy
        ctx.save_for_backward(hidden, weight, rows, row_labels, lse, row_entropy)
        ctx.temperature, ctx.chunk, ctx.shard = temperature, chunk, shard
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, rows, row_labels, lse, row_entropy = ctx.saved_tensors
        shard, t, chunk = ctx.shard, ctx.temperature, ctx.chunk
        start, valid = (shard.start, shard.valid) if shard is not None else (0, weight.shape[0])
        group = shard.group if shard is not None else None
        none = (None,) * 6
        if (grad_logp is None and grad_entropy is None) or rows.numel() == 0:
            return (torch.zeros_like(hidden), torch.zeros_like(weight)) + none
        work = _work_dtype(hidden)
        w = weight[:valid]
        # The hidden-state gradient is summed over the vocabulary group: keep it in the work dtype then.
        grad_h = torch.zeros_like(hidden, dtype=work if group is not None else hidden.dtype)
        # Accumulated over chunks: fp32 whatever the weight's dtype (one rounding at the end).
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for s in range(0, rows.shape[0], chunk):
            r, lab = rows[s : s + chunk], row_labels[s : s + chunk] - start
            if valid == 0:
                continue
            h = hidden.index_select(0, r)
            glp = (
                grad_logp[r].to(work)
                if grad_logp is not None
                else torch.zeros(r.shape[0], dtype=work, device=hidden.device)
            )
            log_p = _chunk_logits(h, w, t, work).sub_(lse[s : s + chunk, None])
            if grad_entropy is not None:
                gh = grad_entropy[r].to(work)[:, None]
                g = log_p.add(row_entropy[s : s + chunk, None]).mul_(gh).add_(glp[:, None]).mul_(log_p.exp_()).neg_()
            else:
                g = log_p.exp_().mul_(-glp[:, None])
            own = (lab >= 0) & (lab < valid)
            g.scatter_add_(1, lab.clamp(0, valid - 1)[:, None], torch.where(own, glp, 0.0)[:, None])
            g = g.div_(t).to(weight.dtype)  # the logits' gradient in the logits' dtype, as the plain path
            grad_h.index_copy_(0, r, (g @ w).to(grad_h.dtype))
            # the chunk's contribution in the operands' dtype (tensor cores), summed over chunks in fp32
            grad_w[:valid].add_(g.t() @ h)
        if group is not None:
            dist.all_reduce(grad_h, group=group)
        return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype)) + none


def _combine_over_vocab(local_lse, target, local_pz, group):
    """Per row: global ``logsumexp``, the label's logit and ``Σ p z`` from every rank's slice."""
    stats = torch.stack([local_lse, target, local_pz])  # [3, n]
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats.contiguous(), group=group)
    every = torch.stack(parts)  # [ranks, 3, n]
    lse = torch.logsumexp(every[:, 0], dim=0)
    # Slice r's softmax is exp(lse_r - lse) times its local one: Σ p z = Σ_r exp(lse_r - lse) · (Σ p z)_r.
    pz = (torch.exp(every[:, 0] - lse) * every[:, 2]).nan_to_num(0.0).sum(0)
    return lse, every[:, 1].sum(0), pz


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp, entropy)`` per token, each ``[T]`` fp32 (fp64 for fp64 inputs); 0 where ``labels == -100``.

    ``logp[t] = log_softmax(hidden[t] · weightᵀ / temperature)[labels[t]]``; ``entropy`` is ``None``
    unless ``with_entropy``. ``hidden`` is ``[T, H]`` (the final norm's output), ``weight`` the LM head
    ``[V, H]`` (this rank's vocabulary slice under ``shard``; ``labels`` are global ids either way).
    Differentiable in ``hidden`` and ``weight`` through both outputs; never holds more than
    ``chunk_rows`` rows of logits.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected labels [T] for hidden {tuple(hidden.shape)}, got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if shard is not None and not 0 <= shard.valid <= weight.shape[0]:
        raise ValueError(f"shard.valid={shard.valid} outside the local vocabulary of {weight.shape[0]} rows")
    labels = labels.to(hidden.device)
    rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    logp, entropy = _FusedHeadTokenStats.apply(
        hidden, weight, rows, labels[rows], float(temperature), int(max(1, chunk_rows)), bool(with_entropy), shard
    )
    return logp, (entropy if with_entropy else None)


def fused_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sum over labelled tokens of ``cross_entropy(hidden[t] · weightᵀ, labels[t])`` (fp32 scalar);
    keyword arguments as :func:`fused_token_logprobs`."""
    return -fused_token_logprobs(hidden, weight, labels, **kwargs)[0].sum()
