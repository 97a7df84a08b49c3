"""`memento-data stats` / `memento-data prepare` and their error handling."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest

from memento_train.data.cli import main
from memento_train.data.pack import IGNORE_INDEX, batch_from_row
from memento_train.data.stats import KV_GEOMETRY, load_geometry


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
    rc, out, err = run(capsys, "stats", "--cache-dir", str(tmp_path), "--pack-tokens", "8192",
                       "--model-config", "olmo-3-7b")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("peak KV reduction"))
    assert float(line.split()[-4].rstrip("x")) > 1.5  # the "all" column
    assert "validation: 3 records, 3 kept" in out and "packing: 3 docs into 2 bins of 8192" in out
    assert "sliding window" in out


def test_geometry_table_and_config_json(tmp_path):
    assert KV_GEOMETRY["qwen3-8b"].bytes_per_token_per_layer * 36 == 36 * 8 * 128 * 2 * 2
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256,
           "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"] * 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = load_geometry(str(tmp_path))
    assert (g.layers, g.kv_heads, g.head_dim, g.sliding_layers, g.sliding_window) == (4, 2, 32, 2, 16)
    kill = np.full(100, 100)
    per_layer = g.bytes_per_token_per_layer
    assert g.live_bytes(kill).max() == per_layer * (2 * 100 + 2 * 16)
    with pytest.raises(ValueError, match="neither a built-in"):
        load_geometry("llama-9000")


def test_prepare_writes_loadable_dataset(capsys, tmp_path):
    out_dir = tmp_path / "packed"
    rc, out, err = run(capsys, "prepare", str(tmp_path / "missing.jsonl"), "--output", str(out_dir))
    assert rc == 2 and "does not exist" in err
    from memento_train.data.config import SAMPLE_TRACES

    rc, out, err = run(capsys, "prepare", SAMPLE_TRACES, "--output", str(out_dir), "--cache-dir",
                       str(tmp_path / "c"), "--pack-tokens", "8192", "--pad-to", "64")
    assert rc == 0, err
    assert "3 kept" in out and "wrote 2 packed micro-batches" in out
    ds = datasets.load_from_disk(str(out_dir))
    assert len(ds) == 2
    batches = [batch_from_row(r) for r in ds]
    ids = [r for b in batches for r in b.record_ids]
    assert len(ids) == len(set(ids)) == 3  # every record packed exactly once
    for b in batches:
        assert b.num_tokens % 64 == 0 and int(b.doc_lengths.sum()) <= 8192
        cu = b.cu_seqlens.tolist()
        assert all(b.labels[e - 1] == IGNORE_INDEX for e in cu[1:])
        assert (b.kill_row.long() <= b.num_tokens).all()
    meta = json.loads((out_dir / "memento_prepare.json").read_text())
    assert meta["num_batches"] == 2 and meta["config"]["block_masking"]["keep_last_n_blocks"] == 0
    # Existing output is not overwritten silently.
    rc, out, err = run(capsys, "prepare", SAMPLE_TRACES, "--output", str(out_dir))
    assert rc == 2 and "--overwrite" in err
    # A budget smaller than a record is a clear error.
    rc, out, err = run(capsys, "prepare", SAMPLE_TRACES, "--output", str(tmp_path / "p2"), "--cache-dir",
                       str(tmp_path / "c"), "--pack-tokens", "1000")
    assert rc == 2 and "--pack-tokens" in err


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
    assert err.startswith("memento-data: configuration error:" if needle.startswith("--") and needle != "--model-config"
                          else "memento-data: error:")


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
    res = subprocess.run([*cmd, "stats", "--json", "--cache-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["overall"]["peak_kv_reduction"] > 1.5
