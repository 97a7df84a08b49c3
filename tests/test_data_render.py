"""Rendering records to token streams: ChatML layout, prompt masking, kinds and kill rows, loading."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memento_train import tokens as T
from memento_train.config.errors import ConfigError
from memento_train.data.config import SAMPLE_TRACES, DataConfig
from memento_train.data.records import (
    RecordFieldError,
    assemble_full_response,
    load_records,
    normalize_row,
)
from memento_train.data.render import IGNORE_INDEX, Renderer
from memento_train.masking import BlockMaskingConfig, Kind, kill_rows, parse
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer

# CI layout: <parent>/main (repo root) and <parent>/shared (see tests/conftest.py).
SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "memento_traces.jsonl"
_UNIT = re.compile(r"<\|block_start\|>(.*?)<\|block_end\|>\n<\|summary_start\|>(.*?)<\|summary_end\|>\n", re.S)


@pytest.fixture(scope="module")
def tok():
    return load_shipped_tokenizer()


@pytest.fixture(scope="module")
def renderer(tok):
    return Renderer(tok, BlockMaskingConfig(keep_last_n_blocks=0))


@pytest.fixture(scope="module")
def raw_traces():
    with open(SAMPLE_TRACES, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def traces(raw_traces):
    return [normalize_row(r, i, "default") for i, r in enumerate(raw_traces)]


def test_sample_is_the_shared_fixture():
    if SHARED_TRACES.exists():
        assert Path(SAMPLE_TRACES).read_bytes() == SHARED_TRACES.read_bytes()


def test_real_traces_render(renderer, traces, tok):
    ids_of = T.special_token_ids(tok)
    for rec in traces:
        ex = renderer.render(rec)
        n, p = ex.num_tokens, ex.prompt_len
        assert ex.input_ids.dtype == np.int32 and ex.kinds.dtype == np.int8 and ex.kill_row.dtype == np.int32
        assert len(ex.labels) == len(ex.kinds) == len(ex.kill_row) == n
        # Prompt: exact ChatML text, all PROMPT kinds, labels masked; everything after is trained.
        prompt = f"<|im_start|>user\n{rec['problem']}<|im_end|>\n<|im_start|>assistant\n"
        assert renderer.decode(ex.input_ids[:p]) == prompt
        assert renderer.decode(ex.input_ids[p:]) == rec["response"] + "<|im_end|>\n"
        assert (ex.kinds[:p] == Kind.PROMPT).all() and (ex.kinds[p:] != Kind.PROMPT).all()
        assert (ex.labels[:p] == IGNORE_INDEX).all()
        assert (ex.labels[p:] == ex.input_ids[p:]).all()
        assert ids_of[T.IM_END] in ex.labels[p:].tolist()
        # Memento/think tokens are single ids, one per occurrence in the text.
        for name in (*T.MEMENTO_TOKENS, *T.THINK_TOKENS):
            assert int((ex.input_ids == ids_of[name]).sum()) == rec["response"].count(name), name
        # Kinds: one BLOCK_DELIM pair and one SUMMARY_DELIM pair per block.
        nblocks = rec["response"].count(T.BLOCK_START)
        assert len(ex.parsed.blocks) == nblocks
        assert int((ex.kinds == Kind.BLOCK_DELIM).sum()) == 2 * nblocks
        assert int((ex.kinds == Kind.SUMMARY_DELIM).sum()) == 2 * nblocks
        # Kill rows: exactly the parser's, and the DESIGN rule for keep_last_n_blocks=0.
        ref = kill_rows(ex.input_ids.tolist(), ids_of, keep_last_n_blocks=0, mask_delimiters=False, prompt_len=p)
        assert ex.kill_row.tolist() == ref
        for b in ex.parsed.blocks:
            assert (ex.kill_row[b.start + 1 : b.end] == b.summary_end).all()
            assert ex.kill_row[b.start] == n and ex.kill_row[b.end] == n
            assert (ex.kill_row[b.summary_start : b.summary_end + 1] == n).all()
        assert (ex.kill_row[:p] == n).all()


def test_stage1_renders_no_eviction(tok, traces):
    r = Renderer(tok, BlockMaskingConfig(keep_last_n_blocks=-1))
    ex = r.render(traces[0])
    assert (ex.kill_row == ex.num_tokens).all()


def test_mask_delimiters_evicts_delimiters(tok, traces):
    r = Renderer(tok, BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=True))
    ex = r.render(traces[1])
    b = ex.parsed.blocks[0]
    assert ex.kill_row[b.start] == b.summary_end and ex.kill_row[b.end] == b.summary_end


def test_system_prompt_and_template_free_path(tok, traces):
    with_sys = Renderer(tok, system_prompt="Be brief.").render(traces[0])
    text = Renderer(tok, system_prompt="Be brief.").decode(with_sys.input_ids[: with_sys.prompt_len])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    # Without a chat template the literal ChatML layout gives the same ids as the shipped template.
    plain = load_shipped_tokenizer()
    plain.chat_template = None
    a = Renderer(tok, system_prompt="Be brief.").render(traces[2])
    b = Renderer(plain, system_prompt="Be brief.").render(traces[2])
    assert not Renderer(plain).use_template
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.prompt_len == b.prompt_len


def test_truncate_reparses_prefix(renderer, traces):
    ex = renderer.render(traces[0])
    cut = renderer.truncate(ex, ex.prompt_len + 300)
    assert cut.num_tokens == ex.prompt_len + 300
    assert (cut.kinds == ex.kinds[: cut.num_tokens]).all()
    assert (cut.kill_row == np.minimum(ex.kill_row[: cut.num_tokens], cut.num_tokens)).all()


def _full_record(raw: dict, with_response: bool) -> dict:
    """Split a default-config response into the `full` config's sentences/blocks/summaries."""
    think, answer = raw["response"].split("</think>", 1)
    units = _UNIT.findall(think[len("<think>\n") :])
    sentences, blocks, summaries = [], [], []
    for text, summary in units:
        parts = text.split(". ")
        pieces = [p + "." for p in parts[:-1]] + [parts[-1]]  # " ".join restores the text
        blocks.append([len(sentences), len(sentences) + len(pieces) - 1])
        sentences.extend(pieces)
        summaries.append(summary)
    rec = {k: raw[k] for k in ("problem", "domain", "source", "difficulty")}
    rec.update(sentences=sentences, blocks=blocks, block_summaries=summaries)
    if with_response:
        rec["response"] = raw["response"]
    else:
        rec["final_answer"] = answer[1:]
    return rec


def test_full_config_assembles_default_response(raw_traces, renderer, traces):
    for i, raw in enumerate(raw_traces):
        for with_response in (True, False):
            full = _full_record(raw, with_response)
            assert assemble_full_response(full, "r") == raw["response"]
            norm = normalize_row(full, i, "full")
            assert norm["missing"] == "" and norm["response"] == raw["response"]
        a, b = renderer.render(norm), renderer.render(traces[i])
        assert a.input_ids.tolist() == b.input_ids.tolist()


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.pop("sentences"), "sentences"),
        (lambda r: r.pop("blocks"), "blocks"),
        (lambda r: r["block_summaries"].pop(), "block_summaries"),
        (lambda r: r["blocks"].__setitem__(0, [3, 1]), "blocks"),
        (lambda r: r["blocks"].__setitem__(0, [0, 10**6]), "blocks"),
        (lambda r: r.pop("final_answer"), "answer"),
    ],
)
def test_full_config_missing_pieces_name_record_and_field(raw_traces, edit, field):
    rec = _full_record(raw_traces[0], with_response=False)
    rec["id"] = "trace-7"
    edit(rec)
    with pytest.raises(RecordFieldError) as err:
        assemble_full_response(rec, "trace-7")
    assert err.value.field == field and "trace-7" in str(err.value) and repr(field) in str(err.value)
    norm = normalize_row(rec, 0, "full")
    assert norm["record_id"] == "trace-7" and norm["response"] is None and field in norm["missing"]


def test_load_local_formats(tmp_path, raw_traces):
    cache = str(tmp_path / "cache")
    ds = load_records(DataConfig(path=SAMPLE_TRACES, cache_dir=cache))
    assert ds.column_names == [
        "record_id",
        "problem",
        "response",
        "domain",
        "source",
        "difficulty",
        "missing",
        "reject",
    ]
    assert ds["domain"] == ["math", "science", "code"] and ds["difficulty"] == ["0", "0", "0"]
    assert all(re.fullmatch(r"row\d+-[0-9a-f]{8}", r) for r in ds["record_id"])
    # A directory of parquet files, with an id column; the full config.
    d = tmp_path / "pq"
    d.mkdir()
    rows = [dict(_full_record(r, with_response=False), id=f"id{i}") for i, r in enumerate(raw_traces)]
    pq.write_table(pa.Table.from_pylist(rows[:2]), d / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), d / "b.parquet")
    full = load_records(DataConfig(path=str(d), hf_config="full", cache_dir=cache))
    assert full["record_id"] == ["id0", "id1", "id2"]
    assert full["response"] == [r["response"] for r in raw_traces]


def test_bad_paths_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(DataConfig(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without any"):
        load_records(DataConfig(path=str(tmp_path / "empty")))
    bad = [
        ({"hf_config": "fancy"}, "hf_config"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"overlong": "wrap"}, "overlong"),
        ({"num_proc": 0}, "num_proc"),
        ({"strict": "yes"}, "strict"),
        ({"split": ""}, "split"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ConfigError, match=name):
            DataConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=r"unknown option data.max_len \(did you mean data.max_seq_len\?\)"):
        DataConfig.from_dict({"max_len": 3})
    cfg = DataConfig.from_dict({"max_seq_len": 64, "block_masking": {"keep_last_n_blocks": -1}})
    assert cfg.block_masking == BlockMaskingConfig(keep_last_n_blocks=-1)
    with pytest.raises(ConfigError, match="keep_last_n_blocks"):
        DataConfig.from_dict({"block_masking": {"keep_last_n_blocks": -2}})
    with pytest.deprecated_call(match="data.mask is deprecated; use data.block_masking"):  # the old key
        assert DataConfig.from_dict({"mask": {"keep_last_n_blocks": -1}}).block_masking == cfg.block_masking


def test_renderer_is_consistent_with_parse_under_other_masks(tok, traces):
    for mask in (
        BlockMaskingConfig(keep_last_n_blocks=1),
        BlockMaskingConfig(keep_last_n_blocks=0, keep_last_block_for_answer=True),
    ):
        r = Renderer(tok, mask)
        ex = r.render(traces[0])
        ref = parse(ex.input_ids, r.special, replace(mask), prompt_len=ex.prompt_len)
        assert (ex.kill_row == ref.kill_row).all() and (ex.kinds == ref.kinds).all()


def test_hub_name_goes_to_load_dataset(monkeypatch, raw_traces):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs.get("split")))
        return datasets.Dataset.from_list([dict(r, id=f"hub{i}") for i, r in enumerate(raw_traces)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_records(DataConfig(path="someorg/OpenMementos", hf_config="default", split="train"))
    assert calls == [("someorg/OpenMementos", "default", "train")]
    assert ds["record_id"] == ["hub0", "hub1", "hub2"]


QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_template_that_rewrites_reasoning_leaves_response_verbatim(traces):
    tok = load_shipped_tokenizer()
    tok.chat_template = QWEN3_LIKE
    r = Renderer(tok)
    assert r.use_template and r.turn_end == "<|im_end|>\n"
    ex = r.render(traces[0])
    assert r.decode(ex.input_ids[ex.prompt_len :]) == traces[0]["response"] + "<|im_end|>\n"
    assert len(ex.parsed.blocks) == traces[0]["response"].count(T.BLOCK_START)
