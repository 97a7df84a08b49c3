"""Conformance with the serving engine: ``kill_rows`` reproduces ``shared/fixtures/eviction_cases.json``.

The fixture records what the vLLM 0.13 Memento overlay's block tracker evicted on 16 small streams
(well-formed, truncated, malformed, multi-turn) under every option combination (160 cases).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memento_train.masking import BlockMaskingConfig, kill_rows, parse

# CI clones the repository with shared/ beside it: <parent>/<repo> and <parent>/shared.
CASES_PATH = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "eviction_cases.json"
_DATA = json.loads(CASES_PATH.read_text()) if CASES_PATH.is_file() else None
_CASES = _DATA["cases"] if _DATA else []
_SKIP = pytest.mark.skipif(_DATA is None, reason=f"fixture not found: {CASES_PATH} (clone shared/ beside the repo)")


def _case_id(i: int, case: dict) -> str:
    return (
        f"{i:03d}-{case['kind']}-N{case['keep_last_n_blocks']}"
        f"-{'delims' if case['mask_delimiters'] else 'content'}"
        f"{'-kl4a' if case['keep_last_block_for_answer'] else ''}"
    )


def _options(case: dict) -> dict:
    return dict(
        keep_last_n_blocks=case["keep_last_n_blocks"],
        mask_delimiters=case["mask_delimiters"],
        keep_last_block_for_answer=case["keep_last_block_for_answer"],
    )


@_SKIP
def test_fixture_shape():
    assert len(_CASES) == 160
    kinds = {c["kind"] for c in _CASES}
    assert kinds == {"well_formed", "malformed", "truncated_open_block", "multi_turn"}


@_SKIP
@pytest.mark.parametrize("case", _CASES, ids=[_case_id(i, c) for i, c in enumerate(_CASES)])
def test_kill_rows_match_serving_engine(case):
    got = kill_rows(case["ids"], _DATA["special_token_ids"], prompt_len=case["prompt_len"], **_options(case))
    assert got == case["kill_rows"], _first_mismatch(got, case["kill_rows"])


_SINGLE_TURN = [(i, c) for i, c in enumerate(_CASES) if c["kind"] != "multi_turn"]


@_SKIP
@pytest.mark.parametrize("case", [c for _, c in _SINGLE_TURN], ids=[_case_id(i, c) for i, c in _SINGLE_TURN])
def test_default_prompt_len_gives_the_engine_kill_rows_for_single_turn(case):
    """Single-turn streams need no explicit prompt_len: the default reproduces the engine exactly."""
    parsed = parse(case["ids"], _DATA["special_token_ids"], BlockMaskingConfig(**_options(case)))
    assert parsed.kill_row.tolist() == case["kill_rows"]
    # The default prompt ends right after the 'assistant' token (docs/architecture.md §2); the engine's prompt
    # also holds the header's trailing newline. That token is plain text and, in a single turn, no
    # block can be pending yet, so the one-token difference can never change a kill row.
    assert parsed.prompt_len == case["prompt_len"] - 1
    assert case["ids"][parsed.prompt_len] not in _DATA["special_token_ids"].values()


@_SKIP
def test_multi_turn_cases_need_their_explicit_prompt_len():
    """Multi-turn: the engine's prompt ends at the *last* assistant header, the default at the first;
    the difference matters (otherwise the explicit prompt_len would be untested)."""
    differs = 0
    for case in (c for c in _CASES if c["kind"] == "multi_turn"):
        default = kill_rows(case["ids"], _DATA["special_token_ids"], **_options(case))
        differs += default != case["kill_rows"]
    assert differs > 0


def _first_mismatch(got: list[int], want: list[int]) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return f"first mismatch at key {k}: got kill_row {got[k]}, engine {want[k]}"
