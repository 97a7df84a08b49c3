"""`memento-data stats` / `memento-data prepare` and their error handling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
from tokenizer_dirs import base_tokenizer_without_memento_tokens

from memento_train.data.cache import prepare_dataset
from memento_train.data.cli import main
from memento_train.data.config import DataConfig
from memento_train.data.pack import IGNORE_INDEX
from memento_train.data.stats import KV_GEOMETRY, load_geometry
from memento_train.masking import BlockMaskingConfig
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_stats_on_shipped_sample_json(capsys, tmp_path):
    rc, out, err = run(capsys, "stats", "--json", "--cache-dir", str(tmp_path))
    assert rc == 0, err
    s = json.loads(out)
    assert s["validation"]["total"] == 3 and s["validation"]["kept"] == 3
    assert set(s["by_domain"]) == {"math", "science", "code"}
    overall = s["overall"]
    assert overall["peak_kv_reduction"] > 1.5  # keep_last_n_blocks=0 vs -1
    assert overall["kv_auc_reduction"] > 1.5
    assert overall["compression_ratio"] > 1.0
    assert overall["blocks_per_trace"]["min"] >= 4
    assert overall["peak_kv_gb"]["causal"]["mean"] > overall["peak_kv_gb"]["memento"]["mean"] > 0
    assert s["model"]["name"] == "qwen3-8b" and 0 < s["packing"]["efficiency"] <= 1


def test_stats_table(capsys, tmp_path):
    rc, out, err = run(
        capsys, "stats", "--cache-dir", str(tmp_path), "--pack-tokens", "8192", "--model-config", "olmo-3-7b"
    )
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("peak KV reduction"))
    assert float(line.split()[-4].rstrip("x")) > 1.5  # the "all" column
    assert "validation: 3 records, 3 kept" in out and "packing: 3 docs into 2 bins of 8192" in out
    assert "sliding window" in out


def test_geometry_table_and_config_json(tmp_path):
    assert KV_GEOMETRY["qwen3-8b"].bytes_per_token_per_layer * 36 == 36 * 8 * 128 * 2 * 2
    cfg = {
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = load_geometry(str(tmp_path))
    assert (g.layers, g.kv_heads, g.head_dim, g.sliding_layers, g.sliding_window) == (4, 2, 32, 2, 16)
    kill = np.full(100, 100)
    per_layer = g.bytes_per_token_per_layer
    assert g.live_bytes(kill).max() == per_layer * (2 * 100 + 2 * 16)
    with pytest.raises(ValueError, match="neither a built-in"):
        load_geometry("llama-9000")


def test_prepare_writes_the_tokenized_examples_training_reads(capsys, tmp_path):
    out_dir = tmp_path / "prepared"
    rc, out, err = run(capsys, "prepare", str(tmp_path / "missing.jsonl"), "--output", str(out_dir))
    assert rc == 2 and "does not exist" in err
    from memento_train.data.config import SAMPLE_TRACES

    rc, out, err = run(capsys, "prepare", SAMPLE_TRACES, "--output", str(out_dir), "--cache-dir", str(tmp_path / "c"))
    assert rc == 0, err
    assert "3 kept" in out and "wrote 3 tokenized examples" in out and f"data.prepared={out_dir}" in out
    ds = datasets.load_from_disk(str(out_dir))
    cached, _ = prepare_dataset(
        DataConfig(
            path=SAMPLE_TRACES, cache_dir=str(tmp_path / "c"), block_masking=BlockMaskingConfig(keep_last_n_blocks=0)
        ),
        tokenizer=load_shipped_tokenizer(),
    )
    assert {c: ds[c] for c in ds.column_names} == {c: cached[c] for c in cached.column_names}
    assert all(row[0] == IGNORE_INDEX for row in ds["labels"])  # the prompt is not trained
    meta = json.loads((out_dir / "memento_prepare.json").read_text())
    assert meta["num_examples"] == 3 and meta["key"]["mask"]["keep_last_n_blocks"] == 0
    assert meta["validation"]["kept"] == 3 and meta["tokenizer"]["added_memento_tokens"] == {}
    # Existing output is not overwritten silently.
    rc, out, err = run(capsys, "prepare", SAMPLE_TRACES, "--output", str(out_dir))
    assert rc == 2 and "--overwrite" in err
    # Packing options belong to the trainer now (train.micro_batch_tokens / pad_to_multiple).
    with pytest.raises(SystemExit) as exc:
        main(["prepare", SAMPLE_TRACES, "--output", str(tmp_path / "p2"), "--pack-tokens", "8192"])
    assert exc.value.code == 2


def test_prepare_adds_the_memento_tokens_a_base_tokenizer_lacks_with_the_ids_training_gives(capsys, tmp_path):
    from memento_train.data.config import SAMPLE_TRACES
    from memento_train.models.config import ModelConfig
    from memento_train.models.loading import run_tokenizer
    from memento_train.tokens import MEMENTO_TOKENS, special_token_ids

    base = base_tokenizer_without_memento_tokens(tmp_path / "base")
    rc, out, err = run(
        capsys,
        "prepare",
        SAMPLE_TRACES,
        "--tokenizer",
        str(base),
        "--output",
        str(tmp_path / "p"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert rc == 0, err
    trained = special_token_ids(run_tokenizer(ModelConfig(tokenizer=str(base))))  # what a run adds
    line = next(ln for ln in out.splitlines() if "added the memento tokens" in ln)
    for t in MEMENTO_TOKENS:
        assert f"{t}={trained[t]}" in line
    meta = json.loads((tmp_path / "p" / "memento_prepare.json").read_text())
    assert meta["tokenizer"]["added_memento_tokens"] == {t: trained[t] for t in MEMENTO_TOKENS}
    # base + the added tokens is the shipped tokenizer here, so the examples equal the shipped ones.
    rc, out, err = run(
        capsys, "prepare", SAMPLE_TRACES, "--output", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")
    )
    assert rc == 0 and "added the memento tokens" not in out
    a, b = datasets.load_from_disk(str(tmp_path / "p")), datasets.load_from_disk(str(tmp_path / "s"))
    assert a["input_ids"] == b["input_ids"] and a["kill_row"] == b["kill_row"]
    # stats says so too, on stderr (stdout may be JSON).
    rc, out, err = run(capsys, "stats", "--json", "--tokenizer", str(base), "--cache-dir", str(tmp_path / "c"))
    assert rc == 0 and "added the memento tokens" in err and json.loads(out)["validation"]["kept"] == 3


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["stats", "/no/such/file.jsonl"], "does not exist"),
        (["stats", "--max-seq-len", "1"], "--max-seq-len"),
        (["stats", "--model-config", "gpt-5"], "--model-config"),
        (["stats", "--pack-tokens", "0"], "--pack-tokens"),
        (["stats", "--max-seq-len", "100"], "no valid records"),
    ],
)
def test_bad_input_clear_errors(capsys, tmp_path, argv, needle):
    rc, out, err = run(capsys, *argv, "--cache-dir", str(tmp_path))
    if needle == "no valid records":  # every trace is overlong: report shows it, nothing measured
        assert rc == 0 and "overlong: 3" in out and needle in out
        return
    assert rc == 2 and needle in err
    # A bad flag value is a configuration error (the form of every memento CLI); a bad dataset is not.
    assert err.startswith(
        "memento-data: configuration error:"
        if needle.startswith("--") and needle != "--model-config"
        else "memento-data: error:"
    )


def test_strict_names_record(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "rec-42", "problem": "p", "response": "<think>\n<|block_end|></think>\nx"}) + "\n")
    rc, out, err = run(capsys, "stats", str(bad), "--strict", "--cache-dir", str(tmp_path))
    assert rc == 2 and "rec-42" in err and "stray_delimiter" in err
    rc, out, err = run(capsys, "stats", str(bad), "--cache-dir", str(tmp_path))
    assert rc == 0 and "dropped stray_delimiter: 1 (e.g. rec-42)" in out


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stats", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_console_script(tmp_path):
    exe = shutil.which("memento-data")
    cmd = [exe] if exe else [sys.executable, "-m", "memento_train.data.cli"]
    res = subprocess.run(
        [*cmd, "stats", "--json", "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["overall"]["peak_kv_reduction"] > 1.5
