"""Next-token choice from logits, with vLLM's semantics and per-sequence seeded generators.

Order of operations for ``temperature > 0`` (vLLM v1 sampler):

1. ``logits / temperature``;
2. min-p: drop tokens whose probability is below ``min_p * max_prob`` (probabilities of step 1);
3. top-k: keep the ``top_k`` largest logits (ties with the k-th value are kept);
4. top-p: over the renormalised survivors sorted ascending, drop the tokens whose cumulative mass
   is ``<= 1 - top_p`` (the most likely token always survives);
5. sample from the renormalised survivors with the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``
   drawn from the sequence's own ``torch.Generator``.

``temperature == 0`` is greedy (``argmax`` of the raw logits; the filters do not apply).

The reported log-prob is ``log_softmax(logits / T)[token]`` of the *untruncated* distribution
(``T = 1`` for greedy): what the trainer recomputes from the same logits (``GenerationResult``).

Every sequence draws from its own generator seeded from ``(seed, prompt index, sample index)``, so a
sequence's samples do not depend on which other sequences share its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch

from memento_train.generation.engine import SamplingParams


def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sequence from the request seed and its (prompt, sample) indices."""
    state = np.random.SeedSequence(int(seed), spawn_key=(int(prompt_index), int(sample_index))).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def random_seed() -> int:
    """A fresh base seed for requests that give none (``SamplingParams.seed=None``)."""
    return secrets.randbits(63)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)[token]`` per row (``T = 1`` when ``temperature == 0``); ``[B]``."""
    t = float(temperature) if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.to(_work_dtype(logits)) / t, dim=-1)
    return logp.gather(-1, tokens.reshape(-1, 1).to(logits.device)).squeeze(-1)


def filter_logits(scaled: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Temperature-scaled logits ``[B, V]`` with filtered-out tokens set to ``-inf`` (min-p, top-k, top-p)."""
    out = scaled.clone()
    neg_inf = torch.tensor(float("-inf"), dtype=out.dtype, device=out.device)
    if min_p > 0:
        probs = torch.softmax(out, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        out = torch.where(probs < threshold, neg_inf, out)
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = torch.where(out < kth, neg_inf, out)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=False)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = torch.where(drop, neg_inf, out)
    return out


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of ``logits [B, V]``; returns ``(tokens [B] long, logprobs [B])``.

    ``generators[b]`` (one per row, on the logits' device) drives row ``b``'s randomness; greedy
    needs none. Log-probs follow :func:`token_logprobs` (pre-truncation).
    """
    work = logits.to(_work_dtype(logits))
    if params.greedy:
        tokens = work.argmax(dim=-1)
        return tokens, token_logprobs(work, tokens, 0.0)
    if generators is None or len(generators) != work.shape[0]:
        got = 0 if generators is None else len(generators)
        raise ValueError(f"need one generator per row ({work.shape[0]}), got {got}")
    scaled = work / float(params.temperature)
    filtered = filter_logits(scaled, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
    probs = torch.softmax(filtered, dim=-1)
    vocab = work.shape[-1]
    noise = torch.stack(
        [torch.empty(vocab, dtype=work.dtype, device=work.device).exponential_(generator=g) for g in generators]
    )
    tokens = (probs / noise.clamp_min(torch.finfo(work.dtype).tiny)).argmax(dim=-1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
