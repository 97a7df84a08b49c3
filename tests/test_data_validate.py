"""Validation: every rejection reason from a crafted record, strict mode, overlong drop vs truncate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memento_train.data import validate as V
from memento_train.data.cache import prepare_dataset
from memento_train.data.config import DataConfig
from memento_train.data.records import normalize_row
from memento_train.data.render import Renderer
from memento_train.masking import BlockMaskingConfig
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

BS, BE, SS, SE = "<|block_start|>", "<|block_end|>", "<|summary_start|>", "<|summary_end|>"


def unit(block: str = "We compute the sum.", summary: str = "Sum computed.") -> str:
    return f"{BS}{block}{BE}\n{SS}{summary}{SE}\n"


def trace(body: str, answer: str = "The answer is 4.") -> str:
    return f"<think>\n{body}</think>\n{answer}"


GOOD = trace(unit() + unit("Then we check it twice.", "Checked."))

# reason -> a response that triggers it (as its first problem)
BAD_RESPONSES = {
    V.SUMMARY_WITHOUT_BLOCK: trace(f"{SS}orphan summary{SE}\n" + unit()),
    V.NESTED: trace(f"{BS}outer {BS}inner{BE}\n{SS}s{SE}\n more{BE}\n{SS}t{SE}\n"),
    V.UNCLOSED_BLOCK: trace(unit() + f"{BS}never closed "),
    V.UNCLOSED_SUMMARY: trace(unit() + f"{BS}b{BE}\n{SS}never closed\n"),
    V.STRAY_DELIMITER: trace(unit() + f"{BE}\n" + unit()),
    "stray_summary_end": trace(unit() + f"{SE}\n"),
    V.BLOCK_WITHOUT_SUMMARY: trace(f"{BS}first{BE}\n" + unit()),
    "block_without_summary_at_end": trace(unit() + f"{BS}last block{BE}\n"),
    V.SUMMARY_IN_BLOCK: trace(f"{BS}a{BE}\n{BS}b {SS}s{SE} c{BE}\n{SS}t{SE}\n"),
    V.BLOCK_IN_SUMMARY: trace(f"{BS}a{BE}\n{SS}s {BS}b{BE} t{SE}\n"),
    V.MISSING_THINK_END: "<think>\n" + unit() + "The answer is 4.",
    V.EMPTY_SUMMARY: trace(unit() + unit("More reasoning.", " \n ")),
    V.EMPTY_BLOCK: trace(unit("  \n") + unit()),
}
EXPECTED = {"stray_summary_end": V.STRAY_DELIMITER, "block_without_summary_at_end": V.BLOCK_WITHOUT_SUMMARY}


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_shipped_tokenizer(), BlockMaskingConfig(keep_last_n_blocks=0))


def rec(response, rid="r1", problem="What is 2 + 2?"):
    return normalize_row({"id": rid, "problem": problem, "response": response, "domain": "math"}, 0, "default")


def test_good_record_passes(renderer):
    out = V.check_record(rec(GOOD), renderer, max_seq_len=4096)
    assert out.kept and out.issues == [] and out.reason is None


@pytest.mark.parametrize("case", sorted(BAD_RESPONSES))
def test_each_reason_is_detected(renderer, case):
    want = EXPECTED.get(case, case)
    out = V.check_record(rec(BAD_RESPONSES[case], rid=f"bad-{case}"), renderer, max_seq_len=4096)
    assert not out.kept and out.reason == want, out.issues
    issue = out.issues[0]
    assert issue.position is None or 0 <= issue.position < out_len(renderer, BAD_RESPONSES[case])
    with pytest.raises(V.InvalidRecordError) as err:
        out.raise_if_rejected()
    msg = str(err.value)
    assert f"bad-{case}" in msg and want in msg
    if issue.position is not None:
        assert f"at token {issue.position}" in msg and "near" in msg


def out_len(renderer, response):
    return renderer.render(rec(response)).num_tokens


@pytest.mark.parametrize(
    "row",
    [
        {"id": "m1", "problem": "q", "response": None},
        {"id": "m1", "problem": "", "response": GOOD},
        {"id": "m1", "response": GOOD},
        {"id": "m1", "problem": "q", "response": "   "},
    ],
)
def test_missing_field(renderer, row):
    out = V.check_record(normalize_row(row, 0, "default"), renderer, max_seq_len=4096)
    assert out.reason == V.MISSING_FIELD and "m1" in out.issues[0].detail
    with pytest.raises(V.InvalidRecordError, match="'m1'.*missing_field"):
        out.raise_if_rejected()


def test_reasons_are_all_known():
    row_reasons = {"bad_json", "empty_line", "not_an_object", "wrong_type"}
    assert set(EXPECTED.get(c, c) for c in BAD_RESPONSES) | {V.MISSING_FIELD, V.OVERLONG} | row_reasons == set(
        V.REASONS
    )


def test_overlong_drop_vs_truncate(renderer):
    long = trace("".join(unit(f"Step {i}: " + "we add one more term. " * 6, f"Term {i} added.") for i in range(12)))
    full = renderer.render(rec(long))
    limit = full.num_tokens - 40
    dropped = V.check_record(rec(long), renderer, max_seq_len=limit, overlong="drop")
    assert dropped.reason == V.OVERLONG and "max_seq_len" in dropped.issues[0].detail
    kept = V.check_record(rec(long), renderer, max_seq_len=limit, overlong="truncate")
    assert kept.kept and kept.truncated
    ex = kept.example
    assert ex.num_tokens == limit and (ex.input_ids == full.input_ids[:limit]).all()
    assert (ex.kill_row == np.minimum(full.kill_row[:limit], limit)).all()
    # The cut leaves an open block or summary: never evicted, so nothing is hidden wrongly.
    assert ex.parsed.blocks[-1].summary_end is None
    # A prompt that alone fills max_seq_len cannot be truncated into something trainable.
    prompt_only = V.check_record(rec(long), renderer, max_seq_len=full.prompt_len, overlong="truncate")
    assert prompt_only.reason == V.OVERLONG
    # Structure is checked before truncation: a broken record is not rescued by the cut.
    broken = V.check_record(rec(long + f"{BE}"), renderer, max_seq_len=limit, overlong="truncate")
    assert broken.reason == V.STRAY_DELIMITER


def test_report_counts_and_strict(renderer):
    records = [
        rec(GOOD, "g1"),
        rec(BAD_RESPONSES[V.NESTED], "n1"),
        rec(BAD_RESPONSES[V.EMPTY_BLOCK], "e1"),
        rec(GOOD, "g2"),
        rec(BAD_RESPONSES[V.NESTED], "n2"),
    ]
    kept, report = V.validate_records(records, renderer, max_seq_len=4096)
    assert [k.record_id for k in kept] == ["g1", "g2"]
    assert report.total == 5 and report.kept == 2 and report.dropped == 3
    assert report.dropped_by_reason == {V.NESTED: 2, V.EMPTY_BLOCK: 1}
    text = str(report)
    assert "5 records, 2 kept" in text and "nested_block: 2" in text and "n1" in text
    with pytest.raises(V.InvalidRecordError, match="'n1'.*nested_block"):
        V.validate_records(records, renderer, max_seq_len=4096, strict=True)
    merged = V.ValidationReport().merge(report).merge(report)
    assert merged.total == 10 and merged.dropped_by_reason[V.NESTED] == 4


def _write(path, responses):
    with open(path, "w", encoding="utf-8") as f:
        for rid, resp in responses:
            f.write(json.dumps({"id": rid, "problem": "What is 2 + 2?", "response": resp, "domain": "math"}) + "\n")


def test_prepare_filters_counts_and_strict_names_record(tmp_path):
    data = tmp_path / "mixed.jsonl"
    _write(
        data,
        [
            ("ok-1", GOOD),
            ("bad-sum", BAD_RESPONSES[V.SUMMARY_WITHOUT_BLOCK]),
            ("ok-2", GOOD),
            ("bad-think", BAD_RESPONSES[V.MISSING_THINK_END]),
            ("none", None),
        ],
    )
    cfg = DataConfig(path=str(data), cache_dir=str(tmp_path / "cache"), max_seq_len=4096)
    ds, report = prepare_dataset(cfg)
    assert ds["record_id"] == ["ok-1", "ok-2"]
    assert report.dropped_by_reason == {V.SUMMARY_WITHOUT_BLOCK: 1, V.MISSING_THINK_END: 1, V.MISSING_FIELD: 1}
    cfg.strict = True
    with pytest.raises(V.InvalidRecordError) as err:
        prepare_dataset(cfg)
    assert err.value.record_id == "bad-sum" and err.value.reason == V.SUMMARY_WITHOUT_BLOCK
    assert "bad-sum" in str(err.value) and "at token" in str(err.value)


def test_prepare_overlong_truncate_counts(tmp_path):
    data = tmp_path / "d.jsonl"
    long = trace("".join(unit("word " * 40, f"s{i}") for i in range(6)))
    _write(data, [("short", GOOD), ("long", long)])
    base = dict(path=str(data), cache_dir=str(tmp_path / "cache"), max_seq_len=120)
    ds, report = prepare_dataset(DataConfig(**base, overlong="drop"))
    assert ds["record_id"] == ["short"] and report.dropped_by_reason == {V.OVERLONG: 1}
    ds, report = prepare_dataset(DataConfig(**base, overlong="truncate"))
    assert ds["record_id"] == ["short", "long"] and report.truncated == 1 and report.dropped == 0
    assert ds["num_tokens"][1] == 120 and len(ds["input_ids"][1]) == 120


def _good(rid: str, **extra) -> dict:
    return {"id": rid, "problem": f"What is {rid}?", "response": GOOD, "domain": "math", **extra}


def test_a_jsonl_file_mixing_every_kind_of_bad_line_keeps_every_good_record(tmp_path):
    lines = [
        json.dumps(_good("g1")),
        "{this is not json",  # line 2
        "",  # line 3
        json.dumps(_good("g2", extra={"nested": [1, "a"]}, difficulty=3)),  # unknown columns are ignored
        json.dumps({"id": "t1", "problem": "p", "response": 5}),  # line 5
        json.dumps({"id": "t2", "problem": 3, "response": GOOD}),  # line 6
        json.dumps([1, 2, 3]),  # line 7
        json.dumps(_good("g3", difficulty="hard")),
        json.dumps({"id": "t3", "problem": "p", "response": GOOD, "sentences": "one string"}),  # line 9
        json.dumps(_good("g4")),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(path=str(data), cache_dir=str(tmp_path / "cache"), max_seq_len=4096)
    ds, report = prepare_dataset(cfg)
    assert ds["record_id"] == ["g1", "g2", "g3", "g4"]
    assert report.total == 10 and report.kept == 4
    assert report.dropped_by_reason == {"bad_json": 1, "empty_line": 1, "wrong_type": 3, "not_an_object": 1}
    assert report.examples_by_reason["wrong_type"] == [f"{data}:5", f"{data}:6", f"{data}:9"]
    assert report.examples_by_reason["bad_json"] == [f"{data}:2"]
    text = str(report)
    assert f"empty_line: 1 (e.g. {data}:3)" in text and f"not_an_object: 1 (e.g. {data}:7)" in text
    cfg.strict = True
    with pytest.raises(V.InvalidRecordError) as err:
        prepare_dataset(cfg)
    assert err.value.reason == "bad_json" and str(err.value).startswith(f"{data}:2: ")
    # A wrong type names the field and what it should be.
    data.write_text(lines[0] + "\n" + lines[4] + "\n")
    with pytest.raises(
        V.InvalidRecordError, match=r"mixed.jsonl:2: .*wrong_type.*'response' is 5 \(int\), expected a string"
    ):
        prepare_dataset(cfg)


def test_parquet_rows_of_the_wrong_type_are_named_by_row_index_and_the_rest_kept(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([_good("a0"), _good("a1")]), d / "a.parquet")
    # In this file "problem" is an integer column: each of its rows is the wrong type.
    pq.write_table(
        pa.Table.from_pylist(
            [{"id": "b0", "problem": 1, "response": GOOD}, {"id": "b1", "problem": 2, "response": GOOD}]
        ),
        d / "b.parquet",
    )
    pq.write_table(pa.Table.from_pylist([_good("c0", sentences=["x"]), _good("c1", sentences=None)]), d / "c.parquet")
    ds, report = prepare_dataset(DataConfig(path=str(d), cache_dir=str(tmp_path / "cache"), max_seq_len=4096))
    assert ds["record_id"] == ["a0", "a1", "c0", "c1"]
    assert report.dropped_by_reason == {"wrong_type": 2}
    assert report.examples_by_reason["wrong_type"] == [f"{d / 'b.parquet'}[row 0]", f"{d / 'b.parquet'}[row 1]"]


def test_a_changed_file_is_read_again_not_served_from_the_row_cache(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_good("g1")) + "\n")
    cfg = DataConfig(path=str(data), cache_dir=str(tmp_path / "cache"), max_seq_len=4096)
    assert prepare_dataset(cfg)[0]["record_id"] == ["g1"]
    data.write_text(json.dumps(_good("g1")) + "\n" + json.dumps(_good("g2")) + "\n")
    assert prepare_dataset(cfg)[0]["record_id"] == ["g1", "g2"]
