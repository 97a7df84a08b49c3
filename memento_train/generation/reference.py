"""The reference generation engine: batched sampling with physical KV eviction on a stock HF model.

:class:`ReferenceGenerator` implements :class:`~.engine.GenerationEngine`. All sequences of a call
(``len(prompts) * n``, at most ``max_batch_size`` at a time; a finished sequence's slot is refilled
from the queue) decode together, one model forward per step for the whole batch, over a
:class:`~.batched_cache.BatchedEvictingCache`. Each sequence has its own
:class:`~memento_train.masking.BlockTracker` and its own eviction, exactly as the serving engine:

1. the next token of every row is chosen from its logits: a teacher-forced token, else a forced
   ``<|block_end|>`` once the open block holds ``max_block_tokens`` content tokens (counted like the
   overlay's ``BlockLengthCapLogitsProcessor``: delimiters excluded, prompt included; its log-prob is
   the model's log-prob of ``<|block_end|>``), else a sample (:func:`~.sampling.sample_next`);
2. the row's tracker consumes it and reports the evictions that take effect *before* it is fed (with
   ``keep_last_n_blocks=0`` a block disappears right before its ``<|summary_end|>`` is consumed);
3. those logical spans are physically removed from the row's cache (rows are compacted, the
   tensors trimmed), and the token is run at its *logical* position (RoPE positions never shift).

So every reported log-prob equals what one packed training forward masked with
``masking.parse(prompt + response, ..., prompt_len=len(prompt)).kill_row`` computes
(``tests/test_generation_parity.py``).

Per result: ``kv_trace[i]`` is the live entries per layer (prompt included) the forward that
produced token ``i`` attended over, i.e. ``masking.live_kv_trace(kill_row)[len(prompt) - 1 + i]``;
``kv_bytes[i]`` those entries times the K+V bytes per token across layers in the cache's dtype.
Teacher forcing (``forced_token_ids`` / :meth:`ReferenceGenerator.teacher_force`) feeds given tokens
through the same path and reports the model's log-probs of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from memento_train.attention.hf import attn_implementation_set
from memento_train.generation.batched_cache import (
    BATCHED_DECODE_ATTN,
    BatchedEvictingCache,
    register_batched_decode_attention,
)
from memento_train.generation.engine import BlockMaskingConfig, GenerationResult, SamplingParams
from memento_train.generation.sampling import derive_seed, make_generator, random_seed, sample_next, token_logprobs
from memento_train.masking import BlockTracker, SpecialTokens
from memento_train.tokens import IM_END


@dataclass
class SequenceRequest:
    """One sequence to produce: a prompt, an optional teacher-forced prefix, a token budget, a seed.

    ``forced_token_ids`` are fed first, one per step, whatever the model prefers (their log-probs
    are still reported); sampling continues after them. ``max_new_tokens`` (``None``: the params')
    counts forced tokens too. ``seed`` seeds this sequence's generator (``None``: derived from
    ``(params.seed, prompt_index, sample_index)``).
    """

    prompt_ids: Sequence[int]
    forced_token_ids: Sequence[int] = ()
    max_new_tokens: int | None = None
    seed: int | None = None
    prompt_index: int = 0
    sample_index: int = 0


@dataclass
class _Seq:
    req: SequenceRequest
    tracker: BlockTracker
    budget: int
    seed: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    kv_trace: list[int] = field(default_factory=list)
    storage: list[int] = field(default_factory=list)
    evictions: list[tuple[int, int, int]] = field(default_factory=list)
    forced_block_ends: int = 0
    forced: list[bool] = field(default_factory=list)  # per token: inserted by the block cap
    finish_reason: str | None = None
    in_block: bool = False  # block-length cap state (the overlay's BlockLengthCapLogitsProcessor)
    block_count: int = 0

    def count_block_tokens(self, tok: int, sp: SpecialTokens) -> None:
        """Flat scan, as the serving overlay's cap: block_start opens and resets, block_end closes,
        other non-delimiter tokens inside a block count."""
        if tok == sp.block_start:
            self.in_block, self.block_count = True, 0
        elif tok == sp.block_end:
            self.in_block, self.block_count = False, 0
        elif self.in_block and tok not in (sp.summary_start, sp.summary_end):
            self.block_count += 1


class ReferenceGenerator:
    """Batched generation with per-sequence block tracking and physical KV eviction.

    Args:
        model: a HF causal LM (Qwen3, Phi-3/4, Olmo 3, ...); runs on its device and dtype.
        tokenizer_or_special_ids: a tokenizer holding the memento tokens, or the mapping
            ``tokens.special_token_ids(tokenizer)`` (or a :class:`~memento_train.masking.SpecialTokens`).
            Its ``<|im_end|>`` (a tokenizer's eos) is the default stop token.
        block_masking: eviction options (serving-overlay names).
        max_batch_size: sequences decoding together.
        kv_growth: spare cache slots added when a row outgrows the cache tensors.
        prefill_chunk: prompt tokens per row and forward while prefilling (bounds the attention
            mask/score memory of long prompts).
        track_storage: also record the cache's allocated K/V storage (all rows) at every step in
            ``result.extra["cache_storage_bytes"]``.
    """

    def __init__(
        self,
        model,
        tokenizer_or_special_ids,
        block_masking: BlockMaskingConfig | None = None,
        *,
        max_batch_size: int = 64,
        kv_growth: int = 64,
        prefill_chunk: int = 1024,
        track_storage: bool = False,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (got {max_batch_size})")
        self.model = model
        self.block_masking = block_masking or BlockMaskingConfig()
        self.mask_config = self.block_masking.rule()
        self.special, self.default_stop = _resolve_special(tokenizer_or_special_ids)
        # The cap is the overlay's logits processor, active only with block masking enabled.
        self.block_cap = self.block_masking.max_block_tokens if self.block_masking.enable else None
        self.max_batch_size = int(max_batch_size)
        self.kv_growth = int(kv_growth)
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.track_storage = track_storage
        self.device = next(model.parameters()).device
        register_batched_decode_attention()

    # -- public API ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        forced_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[list[GenerationResult]]:
        """``params.n`` results per prompt, in prompt order. ``forced_token_ids[p]`` (optional) is a
        teacher-forced prefix for every sample of prompt ``p``; sampling continues after it."""
        if forced_token_ids is not None and len(forced_token_ids) != len(prompts):
            raise ValueError(f"{len(forced_token_ids)} forced prefixes for {len(prompts)} prompts")
        forced = forced_token_ids if forced_token_ids is not None else [()] * len(prompts)
        requests = [
            SequenceRequest(prompt, forced[p], prompt_index=p, sample_index=s)
            for p, prompt in enumerate(prompts)
            for s in range(params.n)
        ]
        flat = self.run(requests, params)
        return [flat[p * params.n : (p + 1) * params.n] for p in range(len(prompts))]

    def teacher_force(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, temperature: float = 1.0
    ) -> list[GenerationResult]:
        """Feed ``responses[i]`` after ``prompts[i]`` token by token (with eviction); one result each,
        holding the model's log-probs ``log_softmax(logits / temperature)`` of the given tokens.
        A response stops early only at a stop token (``finish_reason`` "stop"), else "length"."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if any(len(r) == 0 for r in responses):
            raise ValueError("teacher_force needs non-empty responses")
        requests = [
            SequenceRequest(p, r, max_new_tokens=len(r), prompt_index=i)
            for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        return self.run(requests, SamplingParams(max_new_tokens=1, temperature=temperature, seed=0))

    def run(self, requests: Sequence[SequenceRequest], params: SamplingParams) -> list[GenerationResult]:
        """Produce one result per request (the engine's core; :meth:`generate` builds the requests)."""
        stop_ids = frozenset(params.stop_token_ids or self.default_stop)
        base_seed = params.seed if params.seed is not None else random_seed()
        seqs = [self._new_seq(req, params, base_seed) for req in requests]
        queue = deque(seqs)
        active: list[_Seq] = []
        cache: BatchedEvictingCache | None = None
        logits: torch.Tensor | None = None
        per_entry = 0
        with torch.no_grad(), attn_implementation_set(self.model, BATCHED_DECODE_ATTN):
            while queue or active:
                if queue and len(active) < self.max_batch_size:  # (re)fill the batch: prefill newcomers
                    newcomers = [queue.popleft() for _ in range(min(len(queue), self.max_batch_size - len(active)))]
                    new_cache, new_logits = self._prefill(newcomers)
                    per_entry = per_entry or new_cache.bytes_per_entry()
                    if cache is None:
                        cache, logits = new_cache, new_logits
                    else:
                        cache.extend(new_cache)
                        logits = torch.cat([logits, new_logits])
                    active += newcomers
                tokens, logprobs, capped = self._choose(active, logits, params)
                storage = cache.nbytes() if self.track_storage else 0
                keep, pending = [], []
                for row, (s, tok, lp) in enumerate(zip(active, tokens, logprobs)):
                    s.kv_trace.append(cache.lengths[row])
                    if self.track_storage:
                        s.storage.append(storage)
                    s.tokens.append(tok)
                    s.logprobs.append(lp)
                    s.forced.append(row in capped)
                    kind, _, evictions = s.tracker.step(tok)
                    s.kinds.append(int(kind))
                    s.count_block_tokens(tok, self.special)
                    if tok in stop_ids:
                        s.finish_reason = "stop"
                    elif len(s.tokens) >= s.budget:
                        s.finish_reason = "length"
                    else:
                        keep.append(row)
                        pending.append(evictions)
                if len(keep) < len(active):  # finished rows leave the batch (their cache rows are freed)
                    active = [active[r] for r in keep]
                    if not active:
                        cache = logits = None
                        continue
                    cache.select(keep)
                for row, (s, evictions) in enumerate(zip(active, pending)):
                    for ev in evictions:
                        cache.evict(row, ev.start, ev.stop)
                        s.evictions.append((ev.row, ev.start, ev.stop))
                cache.compact()
                logits = self._forward(cache, [[s.tokens[-1]] for s in active])
        return [self._result(s, per_entry) for s in seqs]

    # -- internals -------------------------------------------------------------------------------
    def _new_seq(self, req: SequenceRequest, params: SamplingParams, base_seed: int) -> _Seq:
        if len(req.prompt_ids) == 0:
            raise ValueError("prompts must hold at least one token")
        seed = req.seed if req.seed is not None else derive_seed(base_seed, req.prompt_index, req.sample_index)
        budget = req.max_new_tokens if req.max_new_tokens is not None else params.max_new_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {budget})")
        tracker = BlockTracker(self.special, self.mask_config, prompt_len=len(req.prompt_ids))
        gen = None if params.greedy else make_generator(seed, self.device)
        seq = _Seq(req=req, tracker=tracker, budget=int(budget), seed=seed, generator=gen)
        for tok in req.prompt_ids:
            _, _, evictions = tracker.step(int(tok))
            assert not evictions, "prompt tokens never evict"
            seq.count_block_tokens(int(tok), self.special)
        return seq

    def _prefill(self, seqs: list[_Seq]) -> tuple[BatchedEvictingCache, torch.Tensor]:
        """Prefill the distinct prompts together (left-padded, ``prefill_chunk`` tokens per row and
        forward; prompts never evict), then repeat rows per sequence. Returns the cache and the
        next-token logits ``[len(seqs), V]``."""
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(int(t) for t in s.req.prompt_ids), len(unique)) for s in seqs]
        prompts = list(unique)
        cache = BatchedEvictingCache(config=self.model.config, growth=self.kv_growth)
        last: list[torch.Tensor | None] = [None] * len(prompts)
        for start in range(0, max(len(p) for p in prompts), self.prefill_chunk):
            chunk = [list(p[start : start + self.prefill_chunk]) for p in prompts]
            out = self._forward(cache, chunk)
            for i, p in enumerate(prompts):
                if start < len(p) <= start + self.prefill_chunk:  # this prompt's last token was in the chunk
                    last[i] = out[i]
        logits = torch.stack(last)
        if rows != list(range(len(unique))):
            cache.select(rows)
            logits = logits[torch.tensor(rows, device=logits.device)]
        return cache, logits

    def _forward(self, cache: BatchedEvictingCache, tokens: list[list[int]]) -> torch.Tensor:
        input_ids, position_ids = cache.prepare_inputs(tokens, device=self.device)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            memento_cache=cache,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _choose(self, active: list[_Seq], logits: torch.Tensor, params: SamplingParams):
        """Next token and its log-prob per row: teacher-forced, forced block end, or sampled; and the
        rows whose token the block cap inserted."""
        forced: dict[int, int] = {}
        capped: set[int] = set()
        limit = self.block_cap
        for row, s in enumerate(active):
            i = len(s.tokens)
            if i < len(s.req.forced_token_ids):
                forced[row] = int(s.req.forced_token_ids[i])
            elif limit is not None and s.in_block and s.block_count >= limit:
                forced[row] = self.special.block_end
                s.forced_block_ends += 1
                capped.add(row)
        tokens: list[int] = [0] * len(active)
        logprobs: list[float] = [0.0] * len(active)
        if forced:
            rows = list(forced)
            index = torch.tensor(rows, device=logits.device)
            chosen = torch.tensor([forced[r] for r in rows], device=logits.device)
            lps = token_logprobs(logits[index], chosen, params.temperature)
            for r, t, lp in zip(rows, chosen.tolist(), lps.tolist()):
                tokens[r], logprobs[r] = t, lp
        free = [r for r in range(len(active)) if r not in forced]
        if free:
            index = torch.tensor(free, device=logits.device)
            gens = None if params.greedy else [active[r].generator for r in free]
            toks, lps = sample_next(logits[index], params, gens)
            for r, t, lp in zip(free, toks.tolist(), lps.tolist()):
                tokens[r], logprobs[r] = t, lp
        return tokens, logprobs, capped

    def _result(self, s: _Seq, per_entry: int) -> GenerationResult:
        extra = {
            "seed": s.seed,
            "num_forced": min(len(s.req.forced_token_ids), len(s.tokens)),
            "evictions": s.evictions,  # (row, start, stop): keys [start, stop) freed before row `row`
        }
        if self.track_storage:
            extra["cache_storage_bytes"] = s.storage
        return GenerationResult(
            prompt_ids=[int(t) for t in s.req.prompt_ids],
            token_ids=s.tokens,
            logprobs=s.logprobs,
            kinds=s.kinds,
            kv_trace=s.kv_trace,
            finish_reason=s.finish_reason or "length",
            kv_bytes=[n * per_entry for n in s.kv_trace],
            forced_block_ends=s.forced_block_ends,
            extra=extra,
            forced=s.forced,
        )


def _resolve_special(spec) -> tuple[SpecialTokens, tuple[int, ...]]:
    """``(SpecialTokens, default stop ids)`` from a tokenizer, an id mapping or ``SpecialTokens``."""
    if isinstance(spec, SpecialTokens):
        return spec, ()
    if isinstance(spec, Mapping):
        return SpecialTokens.from_mapping(spec), ((int(spec[IM_END]),) if spec.get(IM_END) is not None else ())
    if hasattr(spec, "get_vocab"):
        from memento_train.tokens import special_token_ids

        ids = special_token_ids(spec)
        eos = getattr(spec, "eos_token_id", None)
        return SpecialTokens.from_mapping(ids), ((int(eos),) if eos is not None else (int(ids[IM_END]),))
    raise TypeError(f"expected a tokenizer, a special-token-id mapping or SpecialTokens, got {type(spec).__name__}")
