"""The synthetic running-total task: deterministic, valid, correct, and summary-dependent under eviction."""

import json
import re

import numpy as np
import pytest

from memento_train.data.cli import main
from memento_train.data.render import Renderer
from memento_train.data.synthetic import SyntheticTaskConfig, synthetic_record, synthetic_records
from memento_train.data.validate import validate_records
from memento_train.evaluation.scoring import is_correct
from memento_train.masking import BlockMaskingConfig, Kind
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

TOK = load_shipped_tokenizer()
RECORDS = synthetic_records(40, SyntheticTaskConfig(seed=7))


def _record_for_pipeline(record):
    return {**record, "record_id": record["id"]}


def test_generation_is_deterministic_and_seeded():
    assert synthetic_records(5, SyntheticTaskConfig(seed=7)) == RECORDS[:5]
    assert synthetic_record(3, SyntheticTaskConfig(seed=7)) == RECORDS[3]
    assert synthetic_records(2, SyntheticTaskConfig(seed=7), offset=3) == RECORDS[3:5]
    assert synthetic_records(5, SyntheticTaskConfig(seed=8)) != RECORDS[:5]


def test_answer_is_the_true_result_of_the_problem_and_math_verify_accepts_the_response():
    for record in RECORDS:
        start = int(re.search(r"Start at (\d+)\.", record["problem"]).group(1))
        ops = re.search(r"every step\): (.*)\. What", record["problem"]).group(1).split(", ")
        value = start
        for op in ops:
            value = (value + int(op)) % 100
        assert record["answer"] == str(value)
        assert is_correct(record["response"], record["answer"])
        assert record["difficulty"] == len(ops)


def test_every_block_restates_the_value_its_previous_summary_carries():
    for record in RECORDS:
        blocks = re.findall(r"<\|block_start\|>The current value is (\d+)\.", record["response"])
        summaries = re.findall(r"the value is (\d+)\.<\|summary_end\|>", record["response"])
        assert len(blocks) == len(summaries) >= 2
        assert blocks[1:] == summaries[:-1]


def test_records_pass_validation_without_drops():
    examples, report = validate_records([_record_for_pipeline(r) for r in RECORDS], Renderer(TOK), max_seq_len=4096)
    assert report.kept == report.total == len(RECORDS) and len(examples) == len(RECORDS)


def test_under_memento_attention_a_block_sees_the_previous_summary_but_not_the_previous_block():
    renderer = Renderer(TOK, BlockMaskingConfig(keep_last_n_blocks=0))
    for record in RECORDS[:10]:
        ex = renderer.render(_record_for_pipeline(record))
        blocks = ex.parsed.blocks
        assert all(b.complete for b in blocks)
        for prev, block in zip(blocks, blocks[1:]):
            first_content = block.start + 1  # the row that starts restating the running value
            prev_content = np.arange(prev.start + 1, prev.end)
            prev_summary = np.arange(prev.summary_start + 1, prev.summary_end)
            assert (ex.kill_row[prev_content] <= first_content).all()
            assert (ex.kill_row[prev_summary] > first_content).all()
            assert (ex.kinds[prev_summary] == Kind.SUMMARY).all()


def test_sloppy_teacher_leaves_that_fraction_of_answers_unboxed_and_ungradable_without_changing_problems():
    from memento_train.rl.rewards import synthetic_reward

    sloppy = synthetic_records(400, SyntheticTaskConfig(seed=7, unboxed_answer_rate=0.75))
    clean = synthetic_records(400, SyntheticTaskConfig(seed=7))
    assert [(r["problem"], r["answer"]) for r in sloppy] == [(r["problem"], r["answer"]) for r in clean]
    unboxed = [r for r in sloppy if "\\boxed" not in r["response"]]
    assert 0.65 < len(unboxed) / len(sloppy) < 0.85
    for r in unboxed:  # the value is right, but a rule-based grader cannot extract it
        assert r["response"].endswith(f"The final value is {r['answer']} (mod 100).")
        assert synthetic_reward(r["response"], r) == 0.0
    assert all(synthetic_reward(r["response"], r) == 1.0 for r in sloppy if r not in unboxed)
    assert SyntheticTaskConfig(seed=7, unboxed_answer_rate=0.0) == SyntheticTaskConfig(seed=7)
    with pytest.raises(ValueError, match="unboxed_answer_rate"):
        SyntheticTaskConfig(unboxed_answer_rate=1.5)


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="min_blocks"):
        SyntheticTaskConfig(min_blocks=3, max_blocks=2)
    with pytest.raises(ValueError, match="modulus"):
        SyntheticTaskConfig(modulus=1)


def test_cli_synth_writes_jsonl_and_rejects_bad_counts(tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    assert main(["synth", "4", "--output", str(out), "--seed", "7"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == RECORDS[:4]
    assert main(["synth", "-1", "--output", str(out)]) == 2
    assert "n must be >= 0" in capsys.readouterr().err
