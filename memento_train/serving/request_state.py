"""Per-request eviction state inside the vLLM scheduler: the tracker, what is due, what is gone.

:class:`RequestEvictions` owns one :class:`~memento_train.masking.BlockTracker` (the state machine
that builds the training masks) per request. The tracker reads the prompt when the request arrives
and every generated token when it is appended; each eviction it reports carries its ``row``: the
logical position of the token before which the block disappears. An eviction is *due* until the
request's KV holds exactly the rows before it (``num_computed_tokens == row``); the scheduler then
applies it (:meth:`take_due`) before scheduling the next tokens, and never lets a chunk run past the
next due row (:meth:`next_row`). So:

- decode: token ``p`` is sampled, its evictions (row ``p``) are applied before ``p`` is fed;
- a multi-turn prompt's completed blocks (docs/architecture.md §2): the tracker reports them at ``prompt_len``
  (the first generated token), so they leave the cache after prefill, before that token is fed;
- preemption: the KV is dropped and recomputed; :meth:`restart` makes every eviction due again, so
  the recomputation runs in chunks that end at each eviction row and reproduces the same cache.

Positions stay logical (RoPE); the cache is physically compacted. A live logical position ``p`` sits
at physical index ``p - (evicted positions before p)``. Spans may overlap (nested blocks): a
position is removed once.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from memento_train.masking import BlockMaskingConfig, BlockTracker, Eviction, SpecialTokens


@dataclass(frozen=True)
class Compaction:
    """What the worker does to one request's cache before the step runs.

    ``removed``: physical ``[start, stop)`` ranges (sorted, disjoint) of the cache as it is now;
    ``length``: the physical entries now; ``num_blocks``: blocks the request keeps afterwards.
    """

    removed: tuple[tuple[int, int], ...]
    length: int
    num_blocks: int

    @property
    def num_removed(self) -> int:
        return sum(b - a for a, b in self.removed)


class RequestEvictions:
    """The eviction bookkeeping of one request (module docstring)."""

    def __init__(
        self, prompt_ids: Sequence[int], special: SpecialTokens, config: BlockMaskingConfig, *, physical: bool = True
    ) -> None:
        self.prompt_len = len(prompt_ids)
        self.compacts = physical  # False: events are recorded, the cache keeps everything (diagnostic)
        self.tracker = BlockTracker(special, config, prompt_len=self.prompt_len)
        for tok in prompt_ids:
            assert not self.tracker.step(int(tok))[2], "prompt tokens never evict"
        self.decided: list[Eviction] = []  # everything the tracker reported, in order
        self._due: deque[Eviction] = deque()  # decided, not yet applied to this incarnation of the cache
        self._gone: list[tuple[int, int]] = []  # merged logical spans removed from the cache
        self.evicted = 0  # physical entries removed (= total length of _gone)
        self.events: list[tuple[int, int, int]] = []  # (row, start, stop) at their first application
        self.restarts = 0
        self.replayed = 0  # evictions re-applied by recomputations after preemption

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, token_id: int) -> list[Eviction]:
        """The tracker consumes the next token; its evictions become due."""
        _, _, evictions = self.tracker.step(int(token_id))
        self.decided.extend(evictions)
        self._due.extend(evictions)
        return evictions

    def next_row(self) -> int | None:
        """Row of the next due eviction (a chunk may not compute it before the eviction is applied)."""
        return self._due[0].row if self._due else None

    # -- applying ------------------------------------------------------------------------------
    def take_due(self, num_computed: int, block_size: int) -> Compaction | None:
        """Apply every eviction due at ``num_computed`` (the cache holds rows ``[0, num_computed)``).

        Returns the physical compaction for the worker, or None when nothing is removed.
        """
        if self._due and self._due[0].row < num_computed:
            raise RuntimeError(
                f"eviction at row {self._due[0].row} is overdue (the cache already holds {num_computed} "
                "rows): a chunk ran past an eviction row"
            )
        length = num_computed - self.evicted
        new_spans: list[tuple[int, int]] = []
        while self._due and self._due[0].row == num_computed:
            ev = self._due.popleft()
            index = len(self.decided) - len(self._due) - 1
            if index >= len(self.events):  # first time; a replay after preemption is not a new event
                self.events.append((ev.row, ev.start, ev.stop))
            new_spans.extend(self._not_yet_gone(ev.start, min(ev.stop, num_computed)))
        if not new_spans or not self.compacts:
            return None
        removed = merge_spans([(self.physical(a), self.physical(a) + (b - a)) for a, b in merge_spans(new_spans)])
        for a, b in new_spans:
            self._add_gone(a, b)
        count = sum(b - a for a, b in removed)
        self.evicted += count
        return Compaction(removed=tuple(removed), length=length, num_blocks=-(-(length - count) // block_size))

    @property
    def planned_evicted(self) -> int:
        """Entries gone once every decided eviction is applied (what a recomputation ends with)."""
        return sum(b - a for a, b in merge_spans([(e.start, e.stop) for e in self.decided]))

    @property
    def evicted_tokens(self) -> int:
        """Distinct positions evicted so far (nested spans counted once)."""
        return sum(b - a for a, b in merge_spans([(a, b) for _, a, b in self.events]))

    def physical(self, position: int) -> int:
        """Physical index of a live logical position."""
        i = bisect.bisect_right(self._gone, (position, float("inf")))
        return position - sum(b - a for a, b in self._gone[:i])

    def restart(self) -> None:
        """The cache was dropped (preemption): it will be recomputed, every eviction is due again."""
        self._due = deque(self.decided)
        self.replayed += len(self.decided)
        self._gone = []
        self.evicted = 0
        self.restarts += 1

    # -- internals -----------------------------------------------------------------------------
    def _not_yet_gone(self, start: int, stop: int) -> list[tuple[int, int]]:
        out, cur = [], start
        for a, b in self._gone:
            if b <= cur:
                continue
            if a >= stop:
                break
            if a > cur:
                out.append((cur, a))
            cur = max(cur, b)
        if cur < stop:
            out.append((cur, stop))
        return out

    def _add_gone(self, start: int, stop: int) -> None:
        self._gone = merge_spans([*self._gone, (start, stop)])


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint union of half-open spans (touching spans join)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
