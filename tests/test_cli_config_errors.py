"""Every memento CLI answers the same bad configuration the same way: one stderr line
``<prog>: configuration error: <message naming the option>`` and exit code 2 (one builder, one error
type: :mod:`memento_train.config.tree`, :class:`memento_train.config.errors.ConfigError`)."""

from __future__ import annotations

import re

import pytest

from memento_train.data.cli import main as data_main
from memento_train.evaluation.cli import main as eval_main
from memento_train.launch.cli import main as launch_main
from memento_train.rl.cli import main as rl_main
from memento_train.sft.cli import main as train_main

LAUNCH = ["slurm", "--nodes", "2", "--dry-run", "--"]

# (program, argv) per CLI for: an unknown key, a bad choice, a bool given as 1.
CASES = {
    "unknown key": [
        ("memento-train", train_main, ["show", "recipe=tiny_stage1", "bogus.key=1"]),
        ("memento-rl", rl_main, ["show", "recipe=tiny_rl", "bogus.key=1"]),
        ("memento-eval", eval_main, ["show", "recipe=tiny_eval", "bogus.key=1"]),
        ("memento-launch", launch_main, [*LAUNCH, "memento-train", "recipe=tiny_stage1", "bogus.key=1"]),
        ("memento-data", data_main, ["stats", "--bogus-key", "1"]),
    ],
    "bad choice": [
        ("memento-train", train_main, ["show", "recipe=tiny_stage1", "engine.kind=jax"]),
        ("memento-rl", rl_main, ["show", "recipe=tiny_rl", "engine.kind=jax"]),
        ("memento-eval", eval_main, ["show", "generator=jax"]),
        ("memento-launch", launch_main, [*LAUNCH, "memento-rl", "recipe=tiny_rl", "engine.kind=jax"]),
        ("memento-data", data_main, ["stats", "--overlong", "jax"]),
    ],
    "bool given as 1": [
        ("memento-train", train_main, ["show", "recipe=tiny_stage1", "train.shuffle=1"]),
        ("memento-rl", rl_main, ["show", "recipe=tiny_rl", "eval.at_start=1"]),
        ("memento-eval", eval_main, ["show", "progress=1"]),
        ("memento-launch", launch_main, [*LAUNCH, "memento-train", "recipe=tiny_stage1", "train.shuffle=1"]),
        ("memento-data", data_main, ["stats", "--strict=1"]),
    ],
}
EXPECTED = {  # what the message says, whatever the CLI
    "unknown key": r"unknown option bogus; valid options at the top level: ",
    "bad choice": r"(engine\.kind|generator|--overlong).* (must be one of|invalid choice).*jax",
    "bool given as 1": r"(train\.shuffle|eval\.at_start|progress) must be true or false, got 1|--strict.*'1'",
}


def _run(main, argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse-style CLIs exit from the parser
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", list(CASES))
def test_the_same_bad_input_gets_the_same_answer_from_every_cli(kind, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for prog, main, argv in CASES[kind]:
        rc, err = _run(main, argv, capsys)
        assert rc == 2, (prog, err)
        assert err.startswith(f"{prog}: configuration error: ") and err.count("\n") == 1, (prog, err)
        if prog != "memento-data":  # flags, not keys: argparse words the same errors its own way
            assert re.search(EXPECTED[kind], err), (prog, err)
        else:
            assert re.search(
                r"unrecognized arguments: --bogus-key|invalid choice: 'jax'|--strict: ignored explicit "
                r"argument '1'",
                err,
            ), err


def test_bool_strictness_is_the_same_for_overrides_and_recipes(tmp_path):
    from memento_train.config.errors import ConfigError
    from memento_train.evaluation.config import load_eval_config
    from memento_train.sft.config import load_sft_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: [tiny_eval]\nprogress: 1\n")
    with pytest.raises(ConfigError, match="progress must be true or false, got 1"):
        load_eval_config(str(recipe), require_output_dir=False)
    with pytest.raises(ConfigError, match="train.shuffle must be true or false, got 'yes'"):
        load_sft_config("tiny_stage1", ["train.shuffle=yes"])  # YAML 1.2 on the command line: yes is text
