"""memento-eval: configuration (defaults < recipe < overrides, validation), problem loading, the CLI
end to end with an injected scripted engine, and with the real ReferenceGenerator (embedded default)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from memento_train.config.errors import ConfigError
from memento_train.config.tree import options_of
from memento_train.evaluation.cli import main
from memento_train.evaluation.config import EvalConfig, build_config, builtin_problem_path
from memento_train.evaluation.report import read_generations
from memento_train.evaluation.runner import generator_override, load_problems, render_prompts
from memento_train.evaluation.scripted import ScriptedEngine, memento_response
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- configuration -------------------------------------------------------------------------------------
def test_defaults_are_the_embedded_default():
    cfg = build_config(["output_dir=/tmp/x"])
    assert cfg.model == "tiny" and cfg.generator == "reference" and cfg.n == 4
    assert cfg.sampling.temperature == 0.6 and cfg.sampling.top_p == 0.95
    assert cfg.max_new_tokens == 96 and cfg.ks == [1, 2, 4]
    assert cfg.block_masking.keep_last_n_blocks == 0 and cfg.block_masking.enable
    assert cfg.problems_path() == str(builtin_problem_path("math_small"))
    assert EvalConfig(model="/some/ckpt").max_new_tokens == 32768


def test_overrides_nested_and_coerced():
    cfg = build_config(
        [
            "output_dir=o",
            "n=8",
            "k=1,4,8",
            "sampling.temperature=1",
            "sampling.max_new_tokens=64",
            "block_masking.keep_last_n_blocks=-1",
            "block_masking.mask_delimiters=true",
            "system_prompt=yes",
            "limit=null",
            "generator_kwargs.max_batch_size=16",
            "progress=false",
        ]
    )
    assert cfg.n == 8 and cfg.ks == [1, 4, 8]
    assert cfg.sampling.temperature == 1.0 and cfg.max_new_tokens == 64
    assert cfg.block_masking.keep_last_n_blocks == -1 and cfg.block_masking.mask_delimiters is True
    assert cfg.system_prompt == "yes" and cfg.limit is None and cfg.progress is False
    assert cfg.generator_kwargs == {"max_batch_size": 16}
    with pytest.deprecated_call(match="engine_kwargs is deprecated; use generator_kwargs"):
        assert build_config(["output_dir=o", "engine_kwargs.max_batch_size=8"]).generator_kwargs == {
            "max_batch_size": 8
        }
    assert build_config(["output_dir=o", "k=[1, 2]"]).ks == [1, 2]
    assert build_config(["output_dir=o", "n=6"]).ks == [1, 2, 4, 6]


def test_recipe_eval_section_then_overrides(tmp_path):
    pytest.importorskip("yaml")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "block_masking:\n  keep_last_n_blocks: 1\n"
        "sft:\n  lr: 1.0e-5\n"
        "eval:\n  n: 2\n  sampling:\n    temperature: 0.8\n    max_new_tokens: 32\n  plot_samples: 1\n"
    )
    cfg = build_config([f"recipe={recipe}", "output_dir=o", "sampling.temperature=0.3"])
    assert cfg.n == 2 and cfg.max_new_tokens == 32 and cfg.plot_samples == 1
    assert cfg.sampling.temperature == 0.3  # the command line wins over the recipe
    assert cfg.block_masking.keep_last_n_blocks == 1  # inherited from the top-level section
    assert cfg.ks == [1, 2]


def test_json_recipe_top_level(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"n": 3, "block_masking": {"enable": False}, "output_dir": "o"}))
    cfg = build_config([f"recipe={recipe}"])
    assert cfg.n == 3 and not cfg.block_masking.enable and cfg.output_dir == "o"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"eval": {"temprature": 1}}))
    with pytest.raises(ConfigError, match="temprature"):
        build_config([f"recipe={bad}", "output_dir=o"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["output_dir=o", "temprature=0.6"], "unknown option temprature; valid options at the top level: "),
        (["output_dir=o", "sampling.temprature=0.6"], "(did you mean sampling.temperature?)"),
        (["output_dir=o", "block_masking.keep_last=0"], "(did you mean block_masking.keep_last_n_blocks?)"),
        (["output_dir=o", "n=four"], "n must be an integer, got 'four'"),
        (["output_dir=o", "n=0"], "n must be >= 1"),
        (["output_dir=o", "k=8"], "k must be in [1, n=4], got 8"),
        (["output_dir=o", "sampling.top_p=1.5"], "sampling.top_p must be in (0, 1]"),
        (["output_dir=o", "sampling.temperature=hot"], "sampling.temperature must be a number"),
        (
            ["output_dir=o", "block_masking.keep_last_n_blocks=-2"],
            "block_masking: keep_last_n_blocks must be an int >= -1",
        ),
        (["output_dir=o", "block_masking.enable=maybe"], "block_masking.enable must be true or false"),
        (["output_dir=o", "progress=1"], "progress must be true or false, got 1"),  # was accepted before
        (["output_dir=o", "generator=hf"], "generator must be one of reference, vllm; got 'hf'"),
        (["output_dir=o", "engine=hf"], "generator must be one of reference, vllm"),  # the deprecated name
        (["output_dir=o", "problems=./missing.jsonl"], "problems './missing.jsonl' does not exist"),
        (["output_dir=o", "kv_geometry=qwen9"], "kv_geometry must be 'auto', one of qwen3-8b"),
        (["output_dir=o", "model=./no/such/ckpt"], "model './no/such/ckpt' is not a checkpoint directory"),
        ([], "output_dir is required"),
        (["output_dir"], "is not an override; write key=value"),
        (["output_dir=o", "recipe=/nope.yaml"], "unknown recipe '/nope.yaml'"),
    ],
)
def test_config_errors_exit_2(capsys, args, needle):
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert err.startswith("memento-eval: configuration error: ") and err.count("\n") == 1
    assert needle in err, err


def test_unknown_key_lists_every_valid_key(capsys):
    rc, _, err = run(capsys, "output_dir=o", "bogus=1")
    assert rc == 2
    for key in options_of(EvalConfig):
        assert key in err


def test_help(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "output_dir=PATH" in out and "sampling.temperature=0.6" in out
    assert "block_masking.keep_last_n_blocks=0" in out and "generator=reference" in out


def test_recipe_names_resolve_shipped_recipes_with_defaults(tmp_path, capsys):
    rc, out, _ = run(capsys, "show", "recipe=tiny_eval", "n=2")
    assert rc == 0 and "n: 2" in out and "problems: builtin:math_small" in out
    child = tmp_path / "child.yaml"  # an eval recipe built on the shipped one
    child.write_text("defaults: [tiny_eval]\nsampling: {temperature: 0.3}\n")
    cfg = build_config([f"recipe={child}", "output_dir=o"])
    assert cfg.sampling.temperature == 0.3 and cfg.sampling.top_p == 0.95 and cfg.n == 4
    rc, out, _ = run(capsys, "recipes")
    assert rc == 0 and "tiny_eval" in out.split()


def test_a_training_recipe_evaluates_its_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tiny_stage1's output_dir is relative: runs/tiny
    rc, _, err = run(capsys, "recipe=tiny_stage1", "output_dir=o")
    assert rc == 2 and "evaluates that recipe's export" in err and "run `memento-train recipe=tiny_stage1` first" in err
    export = tmp_path / "runs" / "tiny" / "hf"
    export.mkdir(parents=True)
    (export / "memento_train.json").write_text(
        json.dumps({"stage": 1, "block_masking": {"keep_last_n_blocks": -1, "mask_delimiters": False}})
    )
    cfg = build_config(["recipe=tiny_stage1", "output_dir=o"])
    assert cfg.model == str(export) and cfg.block_masking.rule().keep_last_n_blocks == -1  # the export's rule
    assert cfg.n == 4 and cfg.generator == "reference"  # the rest is tiny_eval's


# -- problems and prompts ------------------------------------------------------------------------------
def test_shipped_problem_set():
    cfg = EvalConfig(output_dir="o")
    problems = load_problems(cfg)
    assert len(problems) >= 10
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.problem and p.answer for p in problems)
    from memento_train.evaluation.scoring import parse_gold

    assert all(parse_gold(p.answer).found for p in problems)  # every gold answer parses
    assert len(load_problems(EvalConfig(output_dir="o", limit=3))) == 3


def test_problem_set_errors_name_record_and_field(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"id": "a", "problem": "1+1?", "answer": "2"})
        + "\n"
        + json.dumps({"id": "b", "question": "2+2?", "answer": "4"})
        + "\n"
    )
    rc, _, err = run(capsys, f"problems={path}", f"output_dir={tmp_path / 'o'}", "progress=false")
    assert rc == 2
    assert "record 'b'" in err and "field 'problem'" in err and "problem_field=COLUMN" in err
    cfg = EvalConfig(problems=str(path), problem_field="question", output_dir="o")
    with pytest.raises(ValueError, match="record 'a'.*field 'question'"):
        load_problems(cfg)


def test_parquet_problems_and_row_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["1+1?", "2+3?"], "answer": [2, 5]}), str(path))
    problems = load_problems(EvalConfig(problems=str(path), problem_field="question", output_dir="o"))
    assert [(p.id, p.problem, p.answer) for p in problems] == [("row0", "1+1?", "2"), ("row1", "2+3?", "5")]


def test_prompts_end_at_the_assistant_header_as_the_serving_template_does():
    tok = load_shipped_tokenizer()
    problems = load_problems(EvalConfig(output_dir="o", limit=1))
    [ids] = render_prompts(tok, problems)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == f"<|im_start|>user\n{problems[0].problem}<|im_end|>\n<|im_start|>assistant\n"  # no <think>
    # A template whose generation prompt opens <think> itself is served, hence evaluated, as written.
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    [ids2] = render_prompts(tok, problems)
    assert tok.decode(ids2, skip_special_tokens=False).endswith("assistant\n<think>\n")


# -- end to end with an injected scripted engine ---------------------------------------------------------
def _scripted_factory(answers_by_problem: dict[str, str]):
    """Sample 0: gold; 1: an equivalent form via 4 blocks; 2: wrong; 3: no final answer (truncated)."""

    def respond(prompt_text: str, i: int) -> str:
        gold = next(a for q, a in answers_by_problem.items() if q in prompt_text)
        if i == 0:
            return memento_response(2, gold)
        if i == 1:
            return memento_response(4, f"{gold} + 0")
        if i == 2:
            return memento_response(1, "123456789")
        return memento_response(3, gold, end="")[:-60]  # cut before the answer: no </think>, no stop

    def factory(cfg, tokenizer):
        return ScriptedEngine(tokenizer, respond, cfg.block_masking)

    return factory


def test_cli_end_to_end_with_scripted_engine(tmp_path, capsys):
    problems = load_problems(EvalConfig(output_dir="o"))
    out_dir = tmp_path / "out"
    with generator_override(_scripted_factory({p.problem: p.answer for p in problems})):
        rc, out, err = run(
            capsys,
            f"output_dir={out_dir}",
            "sampling.max_new_tokens=4000",
            "progress=false",
            "kv_geometry=qwen3-8b",
            "batch_size=5",
        )
    assert rc == 0, err
    for name in ("generations.jsonl", "summary.json", "summary.md", "kv_sawtooth.png"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "kv_sawtooth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    gens = read_generations(out_dir / "generations.jsonl")
    assert len(gens) == 4 * len(problems)
    keys = {
        "problem_id",
        "sample_index",
        "response",
        "num_tokens",
        "answer",
        "correct",
        "peak_kv",
        "kv_auc",
        "num_blocks",
        "finish_reason",
    }
    assert keys <= set(gens[0])
    by = {(g["problem_id"], g["sample_index"]): g for g in gens}
    p0 = problems[0].id
    assert by[(p0, 0)]["correct"] and by[(p0, 1)]["correct"] and not by[(p0, 2)]["correct"]
    assert by[(p0, 3)]["finish_reason"] == "length" and by[(p0, 0)]["finish_reason"] == "stop"
    assert [by[(p0, i)]["num_blocks"] for i in range(4)] == [2, 4, 1, 3]
    assert "<|block_start|>" in by[(p0, 0)]["response"]
    assert by[(p0, 0)]["answer_class"] == by[(p0, 1)]["answer_class"] != by[(p0, 2)]["answer_class"]

    summary = json.loads((out_dir / "summary.json").read_text())
    m = summary["metrics"]
    assert m["num_problems"] == len(problems) and m["samples_per_problem"] == 4
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx(5 / 6) and m["pass@4"] == pytest.approx(1.0)  # c=2 of n=4
    assert m["maj@1"] == 1.0 and m["maj@2"] == 1.0 and m["maj@4"] == 1.0
    assert m["blocks_per_response"] == pytest.approx(2.5)
    assert 0 < m["compression_summary_per_block"] < 1 < m["compression_block_per_summary"]
    assert m["peak_kv_vs_no_evict"] < 1 and m["kv_auc_vs_no_evict"] < 1
    assert m["kv_model"] == "qwen3-8b" and m["peak_kv_gb_max"] > 0
    assert summary["config"]["sampling"]["max_new_tokens"] == 4000
    md = (out_dir / "summary.md").read_text()
    assert "pass@1" in md and "maj@4" in md and "compression ratio (summary / block tokens)" in md
    assert "| pass@1" in out  # the table is printed too
    assert "wrote kv_sawtooth" in out


def test_cli_no_eviction_reports_ratio_one(tmp_path, capsys):
    problems = load_problems(EvalConfig(output_dir="o", limit=2))
    with generator_override(_scripted_factory({p.problem: p.answer for p in problems})):
        rc, _, err = run(
            capsys,
            f"output_dir={tmp_path}",
            "limit=2",
            "n=2",
            "sampling.max_new_tokens=4000",
            "block_masking.enable=false",
            "progress=false",
            "plot_samples=0",
        )
    assert rc == 0, err
    m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert m["peak_kv_vs_no_evict"] == pytest.approx(1.0) and m["kv_auc_vs_no_evict"] == pytest.approx(1.0)
    assert m["blocks_per_response"] == pytest.approx(3.0)
    assert not (tmp_path / "kv_sawtooth.png").exists()


# -- the real reference engine ---------------------------------------------------------------------------
def _reference():
    return pytest.importorskip(
        "memento_train.generation.reference",
        reason="memento_train.generation.reference (ReferenceGenerator) has not landed yet",
    )


def test_embedded_default_with_reference_engine(tmp_path, capsys):
    """The embedded default (shipped problems, tiny model, reference engine, eviction on), in process;
    ``limit=3`` keeps it short — everything else is exactly what ``memento-eval output_dir=PATH`` runs."""
    _reference()
    out_dir = tmp_path / "demo"
    rc, out, err = run(capsys, f"output_dir={out_dir}", "limit=3", "progress=false")
    assert rc == 0, err[-3000:]
    assert "| pass@1" in out and "model=tiny is a seeded random-weight" in out
    for name in ("generations.jsonl", "summary.json", "summary.md", "kv_sawtooth.png"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    m = summary["metrics"]
    assert m["num_samples"] == 4 * 3 and m["samples_per_problem"] == 4
    assert summary["meta"]["engine"] == "ReferenceGenerator"
    assert summary["config"]["model"] == "tiny" and summary["config"]["generator"] == "reference"
    gens = read_generations(out_dir / "generations.jsonl")
    assert all(1 <= g["num_tokens"] <= 96 for g in gens)
    assert all(g["peak_kv"] >= g["prompt_tokens"] for g in gens)
    assert all(g["finish_reason"] in ("stop", "length") for g in gens)
    assert m["peak_kv_measured_mb_mean"] is not None and m["kv_model"] == "tiny-qwen3"


def test_console_script_entry_point():
    """``python -m memento_train.evaluation.cli`` (what the ``memento-eval`` script calls) starts and fails cleanly."""
    proc = subprocess.run(
        [sys.executable, "-m", "memento_train.evaluation.cli", "n=0"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("memento-eval: configuration error: ")
    exe = shutil.which("memento-eval")
    if exe is not None:  # installed with `pip install -e .`
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "output_dir=PATH" in proc.stdout


def test_scripted_engine_matches_reference_engine_bookkeeping():
    """The fake's kinds / kv_trace convention is the real engine's (teacher-forcing a memento response)."""
    ref = _reference()
    from memento_train.generation.engine import BlockMaskingConfig, SamplingParams
    from memento_train.models import build_tiny_model

    tok = load_shipped_tokenizer()
    [prompt] = render_prompts(tok, load_problems(EvalConfig(output_dir="o", limit=1)))
    response = memento_response(3, "42", block_words=12, summary_words=3)
    bm = BlockMaskingConfig()
    generator = ref.ReferenceGenerator(build_tiny_model(tok), tok, bm)
    scripted = ScriptedEngine(tok, lambda p, i: response, bm)
    [fake] = scripted.generate([prompt], SamplingParams(max_new_tokens=4000))[0]
    [real] = generator.teacher_force([prompt], [fake.token_ids])
    assert real.token_ids == fake.token_ids
    assert real.kinds == fake.kinds
    assert real.kv_trace == fake.kv_trace
    assert real.num_blocks == 3 and real.peak_kv < real.kv_trace[0] + real.num_tokens - 1


# -- the vLLM adapter's wiring (a fake vllm.LLM; no vLLM or GPU needed) --------------------------------------
def test_vllm_engine_wiring_with_fake_llm(tmp_path, capsys):
    from types import SimpleNamespace

    from memento_train.evaluation.config import from_dict
    from memento_train.evaluation.runner import run_eval
    from memento_train.models import tiny_model_config

    tok = load_shipped_tokenizer()
    ckpt = tmp_path / "ckpt"
    tiny_model_config(tok).save_pretrained(str(ckpt))  # config.json: KV geometry "auto" reads it
    tok.save_pretrained(str(ckpt))
    response_ids = tok(memento_response(2, "42"), add_special_tokens=False)["input_ids"]
    built = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            built["kwargs"] = kwargs

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, sampling_params, use_tqdm=True):
            built["sampling"] = sampling_params
            n = sampling_params["n"]
            completion = lambda j: SimpleNamespace(  # noqa: E731
                index=j,
                token_ids=list(response_ids),
                finish_reason="stop",
                logprobs=[{t: SimpleNamespace(logprob=-0.1)} for t in response_ids],
            )
            return [
                SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[completion(j) for j in range(n)])
                for p in prompts
            ]

    cfg = from_dict(
        {
            "engine": "vllm",
            "model": str(ckpt),
            "output_dir": str(tmp_path / "out"),
            "limit": 2,
            "n": 2,
            "progress": False,
            "plot_samples": 1,
            "block_masking": {"keep_last_n_blocks": 1},
            "generator_kwargs": {"llm_factory": FakeLLM, "sampling_params_factory": dict},
        }
    )
    assert cfg.generator == "vllm"  # `engine` is the deprecated name of the key
    outcome = run_eval(cfg.validate())
    kw = built["kwargs"]
    assert kw["model"] == str(ckpt) and kw["dtype"] == "float32" and kw["seed"] == 0  # dtype=auto on CPU
    assert kw["block_masking_config"]["keep_last_n_blocks"] == 1 and kw["enable_prefix_caching"] is False
    sp = built["sampling"]
    assert sp["temperature"] == 0.6 and sp["top_p"] == 0.95 and sp["max_tokens"] == 32768
    assert tok.convert_tokens_to_ids("<|im_end|>") in sp["stop_token_ids"]
    m = outcome.metrics
    assert m["pass@1"] == 0.5  # "42" is right for add-01 only
    assert m["blocks_per_response"] == 2.0 and m["kv_model"] == "ckpt"
    assert m["kv_bytes_per_token"] == 2 * 2 * 16 * 2 * 2  # tiny config, bf16
    assert "| pass@1" in capsys.readouterr().out
