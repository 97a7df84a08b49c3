"""Property tests of the visibility rule (docs/architecture.md §2): ``parse`` / ``kill_rows`` / ``BlockTracker``,
the dense mask and KV accounting, on random well-formed and malformed token streams.

The strongest check is :func:`reference_kill_rows`: a second, deliberately plain implementation
written from the docs/architecture.md §2 text (no code shared with ``masking.py``), compared with ``kill_rows``
on random malformed streams under random options. It is itself validated against the serving
engine's recorded evictions (``shared/fixtures/eviction_cases.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_ids import ASSISTANT, BE, BS, ETHINK, IM_END, IM_START, NL, SE, SPECIAL, SS, THINK, USER  # noqa: F401

from memento_train.masking import (
    BlockMaskingConfig,
    BlockTracker,
    Kind,
    SpecialTokens,
    dense_mask,
    kill_rows,
    kv_stats,
    live_kv_trace,
    parse,
)

# CI clones the repository with shared/ beside it: <parent>/<repo> and <parent>/shared.
CASES_PATH = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "eviction_cases.json"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- an independent reference implementation, from the docs/architecture.md §2 text --------------------------
@dataclass
class _Blk:
    start: int
    end: int | None = None
    summary_start: int | None = None


def reference_kill_rows(
    ids,
    *,
    keep_last_n_blocks,
    mask_delimiters,
    keep_last_block_for_answer=False,
    prompt_len=None,
    require_assistant_section=True,
):
    """kill_row per key, straight from the spec text (deliberately naive: lists and linear scans)."""
    n = len(ids)
    kill = [n] * n
    if require_assistant_section:
        # "tracking starts after the first `assistant` token that comes within two positions after an
        # <|im_start|>; that token itself is not tracked"
        begin = next((i + 1 for i, t in enumerate(ids) if t == ASSISTANT and IM_START in ids[max(0, i - 2) : i]), None)
        if begin is None:
            return kill
    else:
        begin = 0
    # "evictions start with the first token after the prompt (prompt_len; by default right after
    # that assistant token)"
    first_row = begin if prompt_len is None else prompt_len
    blocks: list[_Blk] = []  # in opening order
    stack: list[_Blk] = []
    summary_of: _Blk | None = None
    pending: list[_Blk] = []  # FIFO of complete, not yet evicted blocks

    def evict_oldest(row):
        b = pending.pop(0)
        lo, hi = (b.start, b.end + 1) if mask_delimiters else (b.start + 1, b.end)
        for k in range(lo, hi):
            kill[k] = min(kill[k], row)  # overlapping spans: the earliest eviction wins

    for row in range(begin, n):
        tok = ids[row]
        may_evict = keep_last_n_blocks >= 0 and row >= first_row
        if may_evict and row == first_row:
            # "At prompt_len the serving scheduler first compacts every completed prompt block beyond
            # keep_last_n_blocks (its deferred compaction after prefill)"
            while len(pending) > keep_last_n_blocks:
                evict_oldest(row)
        if tok == BS:
            if may_evict and keep_last_block_for_answer and pending:
                evict_oldest(row)
            b = _Blk(start=row)
            blocks.append(b)
            stack.append(b)
        elif tok == BE:
            if stack:
                stack.pop().end = row
        elif tok == SS:
            closed_unsummarised = [b for b in blocks if b.end is not None and b.summary_start is None]
            if closed_unsummarised:
                summary_of = closed_unsummarised[-1]
                summary_of.summary_start = row
        elif tok == SE:
            if summary_of is not None:
                pending.append(summary_of)
                summary_of = None
                if may_evict and not keep_last_block_for_answer and len(pending) > keep_last_n_blocks:
                    evict_oldest(row)
    return kill


# -- stream strategies -----------------------------------------------------------------------------
_DELIMS = [BS, BE, SS, SE]
_token = st.one_of(
    st.sampled_from(_DELIMS),
    st.sampled_from(_DELIMS),  # delimiters are frequent
    st.sampled_from([IM_START, ASSISTANT, IM_END, USER, NL, THINK, ETHINK]),
    st.integers(20, 40),
)
_headers = st.sampled_from(
    [
        [],  # no assistant section at all
        [IM_START, ASSISTANT],
        [IM_START, USER, 21, 22, IM_END, IM_START, ASSISTANT, NL],
        [IM_START, USER, 21, IM_END, NL, IM_START, NL, ASSISTANT],  # assistant two positions after
        [IM_START, USER, IM_END, IM_START, NL, NL, ASSISTANT],  # three positions: not a header
    ]
)


_plain = st.lists(st.integers(20, 40), max_size=4)
_chunk = st.one_of(
    # a complete block + summary unit: without these, random streams almost never evict anything
    st.tuples(_plain, _plain).map(lambda c: [BS, *c[0], BE, SS, *c[1], SE]),
    st.tuples(_plain, _plain).map(lambda c: [BS, *c[0], BE, NL, SS, *c[1], SE]),
    st.tuples(_plain, _plain, _plain).map(  # nested blocks: inner summarised first, then the outer one
        lambda c: [BS, *c[0], BS, *c[1], BE, BE, SS, *c[2], SE, SS, SE]
    ),
    st.lists(_token, max_size=3),  # lone delimiters, chat tokens, plain text
    st.sampled_from([[IM_START, ASSISTANT], [IM_END, NL, IM_START, USER, 21, IM_END, IM_START, ASSISTANT]]),
)


@st.composite
def malformed_streams(draw, max_size=70):
    """Random mixes of block units, lone delimiters, chat tokens and plain tokens (so nesting, stray and
    missing delimiters, several headers), with or without an assistant header."""
    header = draw(_headers)
    body = [tok for chunk in draw(st.lists(_chunk, max_size=12)) for tok in chunk]
    return header + body[:max_size]


@st.composite
def mask_configs(draw):
    n = draw(st.integers(-1, 3))
    return BlockMaskingConfig(
        keep_last_n_blocks=n,
        mask_delimiters=draw(st.booleans()),
        keep_last_block_for_answer=n <= 0 and draw(st.booleans()),
        require_assistant_section=draw(st.booleans()),
    )


@dataclass
class WellFormed:
    ids: list[int]
    kinds: list[Kind]
    block_ids: list[int]
    blocks: list[dict]  # start, end, summary_start, summary_end (None when truncated before)
    prompt_len: int


@st.composite
def well_formed_streams(draw):
    """A ChatML single-turn Memento trace, optionally truncated anywhere after the prompt."""
    ids, kinds, bids = [], [], []

    def put(tok, kind, bid=-1):
        ids.append(tok)
        kinds.append(kind)
        bids.append(bid)

    for tok in [IM_START, USER, *draw(st.lists(st.integers(20, 40), max_size=3)), IM_END, NL, IM_START, ASSISTANT]:
        put(tok, Kind.PROMPT)
    prompt_len = len(ids)
    put(NL, Kind.OTHER)
    put(THINK, Kind.OTHER)
    blocks = []
    for b in range(draw(st.integers(0, 5))):
        for _ in range(draw(st.integers(0, 2))):
            put(NL, Kind.OTHER)
        blk = {"start": len(ids)}
        put(BS, Kind.BLOCK_DELIM, b)
        for tok in draw(st.lists(st.integers(20, 40), max_size=6)):
            put(tok, Kind.BLOCK, b)
        blk["end"] = len(ids)
        put(BE, Kind.BLOCK_DELIM, b)
        for _ in range(draw(st.integers(0, 2))):
            put(NL, Kind.OTHER)  # between block_end and summary_start: never evicted
        blk["summary_start"] = len(ids)
        put(SS, Kind.SUMMARY_DELIM, b)
        for tok in draw(st.lists(st.integers(20, 40), max_size=4)):
            put(tok, Kind.SUMMARY, b)
        blk["summary_end"] = len(ids)
        put(SE, Kind.SUMMARY_DELIM, b)
        blocks.append(blk)
    put(ETHINK, Kind.OTHER)
    for tok in draw(st.lists(st.integers(20, 40), max_size=4)):
        put(tok, Kind.OTHER)
    cut = draw(st.integers(prompt_len, len(ids)))
    kept = [{k: (v if v < cut else None) for k, v in blk.items()} for blk in blocks if blk["start"] < cut]
    return WellFormed(ids[:cut], kinds[:cut], bids[:cut], kept, prompt_len)


def _kr(ids, cfg, prompt_len=None):
    return parse(ids, SPECIAL, cfg, prompt_len=prompt_len).kill_row


def _cfg(n, delims=False, kl4a=False, require=True):
    return BlockMaskingConfig(
        keep_last_n_blocks=n, mask_delimiters=delims, keep_last_block_for_answer=kl4a, require_assistant_section=require
    )


def _span(blk, delims):
    return range(blk.start, blk.end + 1) if delims else range(blk.start + 1, blk.end)


# -- the reference itself against the serving engine -------------------------------------------
def test_reference_implementation_matches_serving_engine_fixture():
    if not CASES_PATH.is_file():
        pytest.skip(f"fixture not found: {CASES_PATH} (clone shared/ beside the repository)")
    data = json.loads(CASES_PATH.read_text())
    assert data["special_token_ids"] == {k: v for k, v in SPECIAL.items()}
    for case in data["cases"]:
        got = reference_kill_rows(
            case["ids"],
            keep_last_n_blocks=case["keep_last_n_blocks"],
            mask_delimiters=case["mask_delimiters"],
            keep_last_block_for_answer=case["keep_last_block_for_answer"],
            prompt_len=case["prompt_len"],
        )
        assert got == case["kill_rows"], case["kind"]


@SETTINGS
@given(ids=malformed_streams(), cfg=mask_configs(), data=st.data())
def test_kill_rows_equal_independent_reference(ids, cfg, data):
    prompt_len = data.draw(st.one_of(st.none(), st.integers(0, len(ids))), label="prompt_len")
    got = kill_rows(
        ids,
        SPECIAL,
        keep_last_n_blocks=cfg.keep_last_n_blocks,
        mask_delimiters=cfg.mask_delimiters,
        keep_last_block_for_answer=cfg.keep_last_block_for_answer,
        require_assistant_section=cfg.require_assistant_section,
        prompt_len=prompt_len,
    )
    want = reference_kill_rows(
        ids,
        keep_last_n_blocks=cfg.keep_last_n_blocks,
        mask_delimiters=cfg.mask_delimiters,
        keep_last_block_for_answer=cfg.keep_last_block_for_answer,
        prompt_len=prompt_len,
        require_assistant_section=cfg.require_assistant_section,
    )
    assert got == want


@SETTINGS
@given(prefix=st.lists(st.sampled_from([IM_START, ASSISTANT, NL, USER, 21]), max_size=8), delims=st.booleans())
def test_assistant_header_detection_equals_reference(prefix, delims):
    """Where tracking starts: 'assistant' one or two positions after <|im_start|>, not three."""
    ids = prefix + [BS, 30, 31, BE, SS, 32, SE, BS, 33, BE, SS, SE]
    got = kill_rows(ids, SPECIAL, keep_last_n_blocks=0, mask_delimiters=delims)
    assert got == reference_kill_rows(ids, keep_last_n_blocks=0, mask_delimiters=delims)
    header = next((i for i, t in enumerate(ids) if t == ASSISTANT and IM_START in ids[max(0, i - 2) : i]), None)
    assert parse(ids, SPECIAL, _cfg(0, delims)).prompt_len == (len(ids) if header is None else header + 1)


# -- invariants on any stream ----------------------------------------------------------------------
@SETTINGS
@given(ids=malformed_streams(), cfg=mask_configs())
def test_kill_row_bounds_and_no_eviction_in_stage1(ids, cfg):
    p = parse(ids, SPECIAL, cfg)
    n = len(ids)
    k = np.arange(n)
    assert p.kill_row.shape == (n,)
    assert (p.kill_row > k).all() and (p.kill_row <= n).all()
    if cfg.keep_last_n_blocks == -1:
        assert (p.kill_row == n).all() and not p.evictions


@SETTINGS
@given(ids=malformed_streams(), cfg=mask_configs())
def test_evicted_keys_are_exactly_spans_of_evicted_complete_blocks(ids, cfg):
    p = parse(ids, SPECIAL, cfg)
    n = len(ids)
    expected = np.full(n, n)
    for b in p.blocks:
        if b.evicted_at is None:
            continue
        assert b.complete and b.end is not None and b.summary_end <= b.evicted_at
        lo, hi = b.evicted_span(cfg.mask_delimiters)
        assert (lo, hi) == ((b.start, b.end + 1) if cfg.mask_delimiters else (b.start + 1, b.end))
        expected[lo:hi] = np.minimum(expected[lo:hi], b.evicted_at)
    np.testing.assert_array_equal(p.kill_row, expected)
    # Evictions are triggered only after the prompt, by a completing summary_end (or, with
    # keep_last_block_for_answer, by a block_start), one block per trigger at most.
    rows = [ev.row for ev in p.evictions]
    assert len(rows) == len(set(rows))
    assert all(r >= p.prompt_len for r in rows)
    trigger = BS if cfg.keep_last_block_for_answer else SE
    assert all(ids[r] == trigger for r in rows)
    if not cfg.keep_last_block_for_answer:
        assert all(r in {b.summary_end for b in p.blocks} for r in rows)
    # Prompt tokens evict nothing; they die only as part of a block span (multi-turn history).
    spans = set()
    for b in p.blocks:
        if b.evicted_at is not None:
            spans.update(range(*b.evicted_span(cfg.mask_delimiters)))
    assert all(k in spans for k in np.nonzero(p.kill_row[: p.prompt_len] < n)[0])


@SETTINGS
@given(ids=malformed_streams(), n_keep=st.integers(0, 3), kl4a=st.booleans())
def test_mask_delimiters_kills_a_superset_with_the_same_rows_on_content(ids, n_keep, kl4a):
    kl4a = kl4a and n_keep == 0  # keep_last_block_for_answer is defined with N=0 only
    with_delims = parse(ids, SPECIAL, _cfg(n_keep, True, kl4a))
    content = parse(ids, SPECIAL, _cfg(n_keep, False, kl4a))
    assert (with_delims.kill_row <= content.kill_row).all()
    delimiters = {b.start for b in content.blocks} | {b.end for b in content.blocks if b.end is not None}
    others = np.array([k for k in range(len(ids)) if k not in delimiters], dtype=np.int64)
    if others.size:
        np.testing.assert_array_equal(with_delims.kill_row[others], content.kill_row[others])
    # The tracker's decisions do not depend on the option: same blocks evicted at the same rows.
    assert [(e.row, e.block) for e in with_delims.evictions] == [(e.row, e.block) for e in content.evictions]


@SETTINGS
@given(ids=malformed_streams(), delims=st.booleans(), require=st.booleans())
def test_kill_rows_are_monotone_in_keep_last_n_blocks(ids, delims, require):
    rows = [_kr(ids, _cfg(n, delims, require=require)) for n in (0, 1, 2, 3)]
    rows.append(_kr(ids, _cfg(-1, delims, require=require)))  # -1 = keep everything
    for smaller, larger in zip(rows, rows[1:]):
        assert (smaller <= larger).all()


@SETTINGS
@given(ids=malformed_streams(), cfg=mask_configs(), data=st.data())
def test_incremental_tracker_reconstructs_kill_rows(ids, cfg, data):
    prompt_len = data.draw(st.one_of(st.none(), st.integers(0, len(ids))), label="prompt_len")
    tracker = BlockTracker(SpecialTokens.from_mapping(SPECIAL), cfg, prompt_len=prompt_len)
    n = len(ids)
    kill = np.full(n, n)
    for row, tok in enumerate(ids):
        assert tracker.pos == row
        _, _, evictions = tracker.step(tok)
        for ev in evictions:
            assert ev.row == row  # effective before this token is consumed
            assert ev.stop <= row  # only keys already in the cache
            kill[ev.start : ev.stop] = np.minimum(kill[ev.start : ev.stop], row)
    np.testing.assert_array_equal(kill, _kr(ids, cfg, prompt_len))


# -- well-formed traces: the rule in its intended setting ---------------------------------------
@SETTINGS
@given(w=well_formed_streams(), delims=st.booleans())
def test_well_formed_kinds_and_blocks(w, delims):
    p = parse(w.ids, SPECIAL, _cfg(0, delims))
    assert p.prompt_len == w.prompt_len and not p.anomalies
    assert [Kind(k) for k in p.kinds] == w.kinds
    assert p.block_ids.tolist() == w.block_ids
    got = [
        {"start": b.start, "end": b.end, "summary_start": b.summary_start, "summary_end": b.summary_end}
        for b in p.blocks
    ]
    assert got == w.blocks


@SETTINGS
@given(w=well_formed_streams(), n_keep=st.integers(0, 3), delims=st.booleans())
def test_well_formed_block_dies_at_summary_end_of_the_block_n_later(w, n_keep, delims):
    """keep_last_n_blocks=N: the j-th completed block dies at the summary_end of the (j+N)-th (for N=0:
    its own summary_end, which itself no longer sees it); blocks without a summary end never die.

    Equivalently, every row q sees exactly the newest min(N, c(q)) of the c(q) blocks completed at or
    before q (so up to N+1 blocks are visible while a summary is being written, N right after it ends),
    plus any block still open or awaiting its summary."""
    p = parse(w.ids, SPECIAL, _cfg(n_keep, delims))
    n = len(w.ids)
    complete = [b for b in p.blocks if b.complete]
    for j, b in enumerate(complete):
        dies = complete[j + n_keep].summary_end if j + n_keep < len(complete) else n
        span = _span(b, delims)
        assert all(p.kill_row[k] == dies for k in span)
    for b in p.blocks:
        if not b.complete:
            assert b.evicted_at is None
    # The "at most N alive" form of the same statement (observable on blocks with a non-empty span).
    for q in range(p.prompt_len, n):
        done = [b for b in complete if b.summary_end <= q]
        newest = {b.index for b in done[len(done) - min(n_keep, len(done)) :]}
        for b in done:
            if len(_span(b, delims)):
                assert (p.kill_row[_span(b, delims)[0]] > q) == (b.index in newest)


@SETTINGS
@given(w=well_formed_streams(), delims=st.booleans())
def test_well_formed_keep_last_block_for_answer(w, delims):
    """keep_last_block_for_answer (N=0): block i dies at the block_start of block i+1; the last block
    stays visible to the answer."""
    p = parse(w.ids, SPECIAL, _cfg(0, delims, kl4a=True))
    assert (p.kill_row[p.blocks[-1].start :] == len(w.ids)).all() if p.blocks else True  # the last block stays
    for b, nxt in zip(p.blocks, p.blocks[1:] + [None]):
        if b.end is None:  # truncated inside the block
            continue
        dies = nxt.start if (nxt is not None and b.complete) else len(w.ids)
        assert all(p.kill_row[k] == dies for k in _span(b, delims))


@SETTINGS
@given(w=well_formed_streams(), n_keep=st.integers(-1, 3), kl4a=st.booleans(), delims=st.booleans())
def test_non_block_tokens_are_never_evicted_in_well_formed_traces(w, n_keep, kl4a, delims):
    """Prompt, think tags, gaps between block_end and summary_start, summaries and the answer stay."""
    p = parse(w.ids, SPECIAL, _cfg(n_keep, delims, kl4a and n_keep <= 0))
    evictable = {Kind.BLOCK, Kind.BLOCK_DELIM} if delims else {Kind.BLOCK}
    for k, kind in enumerate(w.kinds):
        if kind not in evictable:
            assert p.kill_row[k] == len(w.ids)


# -- dense mask and KV accounting ------------------------------------------------------------------
@FAST
@given(ids=malformed_streams(), cfg=mask_configs(), window=st.one_of(st.none(), st.integers(1, 12)))
def test_live_kv_trace_is_row_sums_of_dense_mask(ids, cfg, window):
    kr = _kr(ids, cfg)
    mask = dense_mask(kr, window=window)
    np.testing.assert_array_equal(live_kv_trace(kr, window=window), mask.sum(1))
    q, k = np.indices(mask.shape)
    np.testing.assert_array_equal(mask, (k <= q) & (q < kr[None, :]) & (True if window is None else (q - k) < window))
    stats = kv_stats(kr, window=window)
    trace = mask.sum(1)
    assert stats.num_tokens == len(ids)
    assert stats.peak == (int(trace.max()) if len(ids) else 0) and stats.auc == int(trace.sum())
    assert stats.to_gb(1000) == pytest.approx((stats.peak * 1e-6, stats.auc * 1e-6), rel=1e-12)
    # Eviction never makes the cache larger than plain causal decoding.
    causal = kv_stats(np.full(len(ids), len(ids)), window=window)
    assert stats.peak <= causal.peak and stats.auc <= causal.auc


@FAST
@given(
    docs=st.lists(malformed_streams(max_size=25), min_size=1, max_size=4),
    cfg=mask_configs(),
    window=st.one_of(st.none(), st.integers(1, 8)),
)
def test_packed_dense_mask_is_block_diagonal(docs, cfg, window):
    lengths = [len(d) for d in docs]
    cu = np.concatenate([[0], np.cumsum(lengths)])
    kr = np.concatenate([_kr(d, cfg) + cu[i] for i, d in enumerate(docs)]) if cu[-1] else np.zeros(0, int)
    mask = dense_mask(kr, cu, window=window)
    expected = np.zeros((cu[-1], cu[-1]), dtype=bool)
    for i, d in enumerate(docs):
        s, e = cu[i], cu[i + 1]
        expected[s:e, s:e] = dense_mask(_kr(d, cfg), window=window)
    np.testing.assert_array_equal(mask, expected)


def test_keep_last_block_for_answer_with_n_above_zero_is_rejected_up_front():
    with pytest.raises(ValueError, match="keep_last_block_for_answer=true requires keep_last_n_blocks=0"):
        BlockMaskingConfig(keep_last_n_blocks=2, keep_last_block_for_answer=True)
    BlockMaskingConfig(keep_last_n_blocks=-1, keep_last_block_for_answer=True)  # no eviction: allowed


@SETTINGS
@given(ids=malformed_streams(), cfg=mask_configs(), data=st.data())
def test_prompt_blocks_beyond_keep_last_n_die_at_prompt_len(ids, cfg, data):
    """Deferred compaction (docs/architecture.md §2): at prompt_len, every block completed inside the prompt except
    the newest keep_last_n_blocks gets kill row prompt_len; none is evicted earlier."""
    prompt_len = data.draw(st.integers(0, len(ids)), label="prompt_len")
    p = parse(ids, SPECIAL, cfg, prompt_len=prompt_len)
    in_prompt = [b for b in p.blocks if b.summary_end is not None and b.summary_end < prompt_len]
    in_prompt.sort(key=lambda b: b.summary_end)  # pending order is completion order
    assert all(ev.row >= prompt_len for ev in p.evictions)
    if not cfg.evicts or prompt_len >= len(ids) or p.prompt_len != prompt_len:
        return  # nothing is generated (or no assistant section): nothing to compact
    doomed = in_prompt[: max(0, len(in_prompt) - cfg.keep_last_n_blocks)]
    assert {b.index for b in p.blocks if b.evicted_at == prompt_len} >= {b.index for b in doomed}
    for b in doomed:
        assert (p.kill_row[list(_span(b, cfg.mask_delimiters))] == prompt_len).all()
