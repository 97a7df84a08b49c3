"""Training from a `memento-data prepare` directory (`data.prepared`) and the data's tokenizer check.

A prepared directory must give a run exactly what rendering the raw records in the run gives: the same
examples, the same micro-batches, the same losses; one rendered differently from the run is refused
before anything trains, naming the option, both values and the flag to change.
"""

from __future__ import annotations

import json

import pytest
import torch
from sft_runs import SMALL, STAGE2
from tokenizer_dirs import base_tokenizer_without_memento_tokens, tokenizer_with_other_template

from memento_train.config.errors import ConfigError
from memento_train.data.cli import main as data_main
from memento_train.data.prepared import MANIFEST, load_examples
from memento_train.models.loading import run_tokenizer
from memento_train.sft.batching import StepPlanner, loss_token_count
from memento_train.sft.cli import main as train_main
from memento_train.sft.config import load_sft_config
from memento_train.training.micro_batches import build_micro_batch

# tiny_stage1 + STAGE2 renders synthetic:48 with max_seq_len 1024 and keep_last_n_blocks 0.
PREPARE = ["prepare", "synthetic:48", "--max-seq-len", "1024", "--keep-last-n-blocks", "0"]


def _cfg(tmp_path, *extra):
    return load_sft_config(
        "tiny_stage1",
        [*SMALL, *STAGE2, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *extra],
    )


def _prepare(dst, *extra, cache):
    assert data_main([*PREPARE, "--output", str(dst), "--cache-dir", str(cache), *extra]) == 0
    return dst


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    return _prepare(root / "syn48", cache=root / "cache")


def _planner(cfg, ds):
    loss_tokens = [loss_token_count(x) for x in ds.with_format("numpy")["labels"]]
    t = cfg.train
    return StepPlanner(
        ds["num_tokens"],
        loss_tokens,
        global_batch_size=t.global_batch_size,
        micro_batch_tokens=t.micro_batch_tokens,
        world_size=2,
        seed=t.seed,
        epochs=t.epochs,
    )


def test_prepared_directory_gives_the_examples_and_micro_batches_of_the_raw_records(tmp_path, prepared):
    raw_cfg, prep_cfg = _cfg(tmp_path), _cfg(tmp_path, f"data.prepared={prepared}")
    tok = run_tokenizer(raw_cfg.model)
    raw, raw_report = load_examples(raw_cfg.data, tok, None)
    prep, prep_report = load_examples(prep_cfg.data, tok, None)
    assert prep.column_names == raw.column_names
    assert all(prep[c] == raw[c] for c in raw.column_names)
    assert prep_report.to_dict() == raw_report.to_dict()
    a, b = _planner(raw_cfg, raw), _planner(prep_cfg, prep)
    cols = ("input_ids", "labels", "kinds", "kill_row")
    for step in range(2):
        plan = a.plan(step)
        assert b.plan(step) == plan
        for micro in plan.per_rank[0]:
            rows = [{c: raw[i][c] for c in cols} for i in micro], [{c: prep[i][c] for c in cols} for i in micro]
            (mb_a, pa), (mb_b, pb) = (
                build_micro_batch(r, pad_to=8, pad_token_id=0, device=torch.device("cpu")) for r in rows
            )
            assert torch.equal(mb_a.input_ids, mb_b.input_ids) and torch.equal(pa.labels, pb.labels)
            assert torch.equal(pa.kill_row, pb.kill_row) and torch.equal(mb_a.position_ids, mb_b.position_ids)


def test_training_from_a_prepared_directory_logs_the_losses_of_training_from_raw_records(tmp_path, prepared):
    from memento_train.sft.driver import run_stage
    from memento_train.training.tracking import read_metrics

    args = ["train.max_steps=2", "checkpoint.export_hf=false"]
    raw = run_stage(_cfg(tmp_path / "raw", *args), progress=False)
    prep = run_stage(_cfg(tmp_path / "prep", *args, f"data.prepared={prepared}"), progress=False)
    losses = [[m["loss"] for m in read_metrics(r.output_dir)] for r in (raw, prep)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    assert (tmp_path / "raw" / "cache" / "memento-prepared").is_dir()
    assert not (tmp_path / "prep" / "cache").exists(), "a prepared run tokenizes nothing"


@pytest.mark.parametrize(
    "extra, needles",
    [
        (
            ["--keep-last-n-blocks", "-1"],
            ["data.block_masking.keep_last_n_blocks: prepared with -1, this run has 0", "--keep-last-n-blocks 0"],
        ),
        (["--max-seq-len", "2048"], ["data.max_seq_len: prepared with 2048, this run has 1024", "--max-seq-len 1024"]),
        (["--system-prompt", "Be brief."], ["data.system_prompt: prepared with 'Be brief.', this run has None"]),
    ],
)
def test_show_refuses_a_prepared_directory_rendered_with_other_options_naming_them(capsys, tmp_path, extra, needles):
    # argparse keeps the last value of a repeated flag: `extra` overrides PREPARE's.
    assert data_main([*PREPARE, *extra, "--output", str(tmp_path / "p"), "--cache-dir", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    rc = train_main(["show", "recipe=tiny_stage1", *SMALL, *STAGE2, f"data.prepared={tmp_path / 'p'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"data.prepared={tmp_path / 'p'} was prepared differently" in err
    for needle in needles:
        assert needle in err


def test_a_prepared_directory_tokenized_with_another_tokenizer_is_refused_naming_both(tmp_path):
    other = tokenizer_with_other_template(tmp_path / "other_tok")
    _prepare(tmp_path / "p", "--tokenizer", str(other), cache=tmp_path / "c")
    cfg = _cfg(tmp_path, f"data.prepared={tmp_path / 'p'}")
    with pytest.raises(
        ConfigError,
        match=r"tokenizer: prepared with '.*other_tok'.*this run's model tokenizes "
        r"with the shipped tokenizer.*\(no --tokenizer\)",
    ):
        load_examples(cfg.data, run_tokenizer(cfg.model), None)
    # A base tokenizer the memento tokens were added to (as training adds them) is the same tokenizer.
    base = base_tokenizer_without_memento_tokens(tmp_path / "base_tok")
    _prepare(tmp_path / "b", "--tokenizer", str(base), cache=tmp_path / "c")
    cfg = _cfg(tmp_path, f"data.prepared={tmp_path / 'b'}")
    assert len(load_examples(cfg.data, run_tokenizer(cfg.model), None)[0]) == 48


def test_data_prepared_must_be_a_prepared_directory_of_this_format(tmp_path, prepared):
    with pytest.raises(ConfigError, match=r"data.prepared=.*no memento_prepare.json.*memento-data prepare"):
        _cfg(tmp_path, f"data.prepared={tmp_path}")
    old = tmp_path / "old"
    old.mkdir()
    (old / MANIFEST).write_text(json.dumps({"num_batches": 2, "config": {}}))  # the old packed layout
    cfg = _cfg(tmp_path, f"data.prepared={old}")
    with pytest.raises(ConfigError, match="older `memento-data prepare`.*re-run"):
        load_examples(cfg.data, run_tokenizer(cfg.model), None)


def test_data_tokenizer_other_than_the_models_is_refused_naming_both(capsys, tmp_path):
    other = tokenizer_with_other_template(tmp_path / "other_tok")
    rc = train_main(["show", "recipe=tiny_stage1", *SMALL, *STAGE2, f"data.tokenizer={other}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"data.tokenizer={other} is not the model's tokenizer (the shipped tokenizer" in err
    assert f"model.tokenizer={other}" in err
    # The same tokenizer (here: a base one that becomes the shipped one once the memento tokens are
    # added, as training adds them) is accepted.
    base = base_tokenizer_without_memento_tokens(tmp_path / "base_tok")
    assert train_main(["show", "recipe=tiny_stage1", *SMALL, *STAGE2, f"data.tokenizer={base}"]) == 0
    assert (
        train_main(
            ["show", "recipe=tiny_stage1", *SMALL, *STAGE2, f"data.tokenizer={other}", f"model.tokenizer={other}"]
        )
        == 0
    )
