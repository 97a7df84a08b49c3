"""Teacher-forced evicting decode: what the serving engine computes, token by token.

The serving engine (vLLM block-masking overlay) decodes a Memento trace one token at a time and,
when the block tracker says so, physically drops a block's KV entries. :class:`EvictingDecoder`
reproduces that with a stock HF model:

1. the :class:`~memento_train.masking.BlockTracker` consumes the token at logical position ``row``
   and reports the evictions that take effect *before* that token is processed (e.g. with
   ``keep_last_n_blocks=0`` the block is dropped before its ``<|summary_end|>`` is consumed, so the
   summary_end token itself no longer sees it, while every summary token before it did);
2. those key spans are removed from every layer of a one-row
   :class:`~.batched_cache.BatchedEvictingCache` (physically: the layer tensors are rebuilt without them);
3. the model runs on the token with ``position_ids = row``: positions stay *logical* (evicted
   tokens keep counting), exactly as the engine keeps logical RoPE positions and uses compacted
   physical slots only for storage.

So a masked packed training forward (``memento_attention`` with ``kill_row`` from
:func:`~memento_train.masking.parse`) and this decode must produce the same logits; the parity test
(``tests/test_parity.py``) checks it to float64 round-off. The decoder is also the core of the
reference generator: sampling only adds a choice of the next token after :meth:`EvictingDecoder.step`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memento_train.attention.hf import attn_implementation_set
from memento_train.generation.batched_cache import (
    BATCHED_DECODE_ATTN,
    BatchedEvictingCache,
    register_batched_decode_attention,
)
from memento_train.masking import BlockMaskingConfig, BlockTracker, Eviction, Kind, SpecialTokens


@dataclass
class KVTrace:
    """Live KV cache while each row is processed (after its own entry was appended).

    ``entries[q]`` is the number of entries one layer holds (equal to
    ``masking.live_kv_trace(kill_row)[q]``: sliding windows are masked, not freed), ``nbytes[q]``
    the bytes of K/V storage held across all layers at that point.
    """

    entries: np.ndarray  # int64 [n]
    nbytes: np.ndarray  # int64 [n]
    evictions: list[Eviction] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return int(self.nbytes.max()) if self.nbytes.size else 0


class EvictingDecoder:
    """Owns a model, a one-row evicting KV cache and a :class:`BlockTracker`; feeds tokens one by one.

    ``step(token_id)`` applies the evictions the tracker reports for this row, then runs the model on
    the token at its logical position and returns its next-token logits ``[V]``. ``feed(ids)`` does
    the same for several tokens, in as few forwards as the evictions allow (one forward per run of
    tokens between eviction rows: a fast prompt prefill, since prompts never evict).

    The model's attention implementation is switched to ``memento_decode_batched`` only for the duration of
    each forward, so the same model object can keep training with ``memento_<backend>``.
    """

    def __init__(
        self,
        model,
        special_token_ids: SpecialTokens | Mapping[str, int],
        mask_config: BlockMaskingConfig,
        *,
        prompt_len: int | None = None,
    ) -> None:
        special = (
            special_token_ids
            if isinstance(special_token_ids, SpecialTokens)
            else SpecialTokens.from_mapping(special_token_ids)
        )
        register_batched_decode_attention()
        self.model = model
        self.tracker = BlockTracker(special, mask_config, prompt_len=prompt_len)
        # growth=0: no spare slots, so the cache's allocated storage is exactly the live entries and
        # the trace's bytes are a measurement of real storage.
        self.cache = BatchedEvictingCache(config=model.config, growth=0)
        self.device = next(model.parameters()).device
        self.kinds: list[Kind] = []
        self.evictions: list[Eviction] = []
        self._entries: list[int] = []
        self._nbytes: list[int] = []

    @property
    def position(self) -> int:
        """Logical position of the next token."""
        return self.tracker.pos

    def step(self, token_id: int) -> torch.Tensor:
        """Consume one token: evict what its row no longer sees, run it, return its logits ``[V]``."""
        row = self.tracker.pos
        kind, _, evictions = self.tracker.step(int(token_id))
        self._evict(evictions)
        logits = self._forward([int(token_id)], [row])
        self.kinds.append(kind)
        self._record(1)
        return logits[0]

    def feed(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Consume several tokens; returns logits ``[T, V]``, identical to calling :meth:`step` on each.

        Tokens are grouped into runs that start at an eviction row; within a run no key dies, so the
        run is one forward with causal attention over the cache plus itself.
        """
        ids = [int(t) for t in token_ids]
        runs: list[tuple[list[Eviction], list[int], list[int]]] = []
        for tok in ids:
            row = self.tracker.pos
            kind, _, evictions = self.tracker.step(tok)
            self.kinds.append(kind)
            if evictions or not runs:
                runs.append((evictions, [], []))
            runs[-1][1].append(tok)
            runs[-1][2].append(row)
        outs = []
        for evictions, run_ids, rows in runs:
            self._evict(evictions)
            outs.append(self._forward(run_ids, rows))
            self._record(len(run_ids))
        if not outs:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            return torch.zeros(0, vocab, device=self.device)
        return torch.cat(outs, 0)

    def trace(self) -> KVTrace:
        """The live KV trace so far (one entry per consumed token)."""
        return KVTrace(
            entries=np.asarray(self._entries, dtype=np.int64),
            nbytes=np.asarray(self._nbytes, dtype=np.int64),
            evictions=list(self.evictions),
        )

    # -- internals -------------------------------------------------------------------------------
    def _evict(self, evictions: list[Eviction]) -> None:
        for ev in evictions:
            # Nested blocks can produce overlapping spans; already-freed positions are ignored.
            self.cache.evict(0, ev.start, ev.stop)
            self.evictions.append(ev)
        self.cache.compact()

    def _forward(self, ids: list[int], rows: list[int]) -> torch.Tensor:
        input_ids, position_ids = self.cache.prepare_inputs([ids], [rows], device=self.device)
        with torch.no_grad(), attn_implementation_set(self.model, BATCHED_DECODE_ATTN):
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
                memento_cache=self.cache,
            )
        return out.logits[0]

    def _record(self, run_len: int) -> None:
        # No key dies inside a run, so the rows of a run held (entries - run_len + 1 + j) entries.
        entries = self.cache.lengths[0]
        total = self.cache.nbytes()  # allocated storage (== entries × bytes per entry: no spare slots)
        per_entry = total // entries if entries else 0
        for j in range(run_len):
            held = entries - (run_len - 1 - j)
            self._entries.append(held)
            self._nbytes.append(held * per_entry)


def teacher_forced_logits(
    model,
    token_ids: Sequence[int],
    special_token_ids: SpecialTokens | Mapping[str, int],
    mask_config: BlockMaskingConfig,
    prompt_len: int | None = None,
) -> tuple[torch.Tensor, KVTrace]:
    """Feed ``token_ids`` one token at a time through ``model`` with physical KV eviction.

    Mimics the serving engine: before the token at row ``q`` is consumed, the evictions the block
    tracker reports for row ``q`` are applied (so with ``keep_last_n_blocks=0`` a block disappears
    right before its ``<|summary_end|>`` is consumed), and every token is run at its logical
    position ``q``. Returns the logits ``[n, V]`` (row ``q`` predicts token ``q+1``) and the live KV
    trace (entries per layer and K/V bytes after each step). With the same ``mask_config`` and
    ``prompt_len`` these logits equal a packed training forward masked with
    ``masking.parse(...).kill_row``.
    """
    decoder = EvictingDecoder(model, special_token_ids, mask_config, prompt_len=prompt_len)
    rows = [decoder.step(int(tok)) for tok in token_ids]
    if rows:
        logits = torch.stack(rows, 0)
    else:
        vocab = model.get_output_embeddings().weight.shape[0]
        logits = torch.zeros(0, vocab, device=decoder.device)
    return logits, decoder.trace()
