"""Packing invariants (hypothesis), real-trace packing, and the Arrow cache (round trip, num_proc)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memento_train.data.cache import cache_fingerprint, prepare_dataset
from memento_train.data.config import SAMPLE_TRACES, DataConfig
from memento_train.data.pack import (
    IGNORE_INDEX,
    OverlongDocumentError,
    collate,
    pack_examples,
    plan_bins,
)
from memento_train.data.records import normalize_row
from memento_train.data.render import Renderer
from memento_train.masking import BlockMaskingConfig, Kind, dense_mask
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer


def make_doc(rng: np.random.Generator, n: int, rid: str) -> dict:
    prompt = int(rng.integers(0, n + 1))
    ids = rng.integers(0, 1000, n)
    labels = ids.copy()
    labels[:prompt] = IGNORE_INDEX
    kill = np.array([rng.integers(k + 1, n + 1) for k in range(n)], dtype=np.int64)
    kinds = rng.integers(0, 6, n).astype(np.int8)
    return {"input_ids": ids, "labels": labels, "kill_row": kill, "kinds": kinds, "record_id": rid}


def check_batch(batch, docs_by_id, max_tokens=None, pad_to=None):
    T = batch.num_tokens
    cu = batch.cu_seqlens.numpy().astype(np.int64)
    assert batch.cu_seqlens.dtype.is_floating_point is False and str(batch.cu_seqlens.dtype) == "torch.int32"
    assert str(batch.kill_row.dtype) == "torch.int32" and str(batch.kinds.dtype) == "torch.int8"
    assert cu[0] == 0 and cu[-1] == T and (np.diff(cu) > 0).all()
    D = len(batch.record_ids)
    assert batch.doc_lengths.tolist() == np.diff(cu)[:D].tolist()
    assert batch.num_pad == T - int(batch.doc_lengths.sum())
    assert len(cu) == D + 1 + (1 if batch.num_pad else 0)
    assert batch.max_seqlen == int(np.diff(cu).max())
    if max_tokens is not None:
        assert int(batch.doc_lengths.sum()) <= max_tokens
    if pad_to is not None:
        assert T % pad_to == 0 and batch.num_pad < pad_to
    ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
    pos, kill = batch.position_ids.numpy(), batch.kill_row.numpy().astype(np.int64)
    for d in range(len(cu) - 1):
        s, e = cu[d], cu[d + 1]
        assert (pos[s:e] == np.arange(e - s)).all()  # positions restart per document
        assert labels[e - 1] == IGNORE_INDEX  # never predicts the next document's first token
        assert (kill[s:e] >= np.arange(s, e) + 1).all() and (kill[s:e] <= e).all()
        if d < D:
            doc = docs_by_id[batch.record_ids[d]]
            n = len(doc["input_ids"])
            assert e - s == n and (ids[s:e] == doc["input_ids"]).all()
            assert (kill[s:e] == s + np.minimum(doc["kill_row"], n)).all()  # global = start + local
            assert (labels[s : e - 1] == doc["labels"][1:]).all()  # shifted within the document
            assert (batch.kinds.numpy()[s:e] == doc["kinds"]).all()
        else:  # padding pseudo-document
            assert (labels[s:e] == IGNORE_INDEX).all() and (kill[s:e] == e).all()
            assert (batch.kinds.numpy()[s:e] == Kind.OTHER).all()
    # The packed mask is exactly the block diagonal of the per-document masks.
    if T <= 256:
        packed = dense_mask(kill, cu)
        for d in range(len(cu) - 1):
            s, e = cu[d], cu[d + 1]
            assert (packed[s:e, s:e] == dense_mask(kill[s:e] - s)).all()
            assert not packed[s:e, :s].any() and not packed[s:e, e:].any()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 48), min_size=1, max_size=14),
    extra=st.integers(0, 80),
    pad_to=st.sampled_from([None, 1, 8, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packing_invariants(lengths, extra, pad_to, seed):
    rng = np.random.default_rng(seed)
    docs = [make_doc(rng, n, f"d{i}") for i, n in enumerate(lengths)]
    max_tokens = max(lengths) + extra
    bins = plan_bins(lengths, max_tokens)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # every document placed exactly once
    assert all(sum(lengths[i] for i in b) <= max_tokens for b in bins)
    assert len(bins) >= -(-sum(lengths) // max_tokens)
    batches, stats = pack_examples(docs, max_tokens, pad_to=pad_to)
    by_id = {d["record_id"]: d for d in docs}
    seen = []
    for batch in batches:
        check_batch(batch, by_id, max_tokens, pad_to)
        seen += batch.record_ids
    assert sorted(seen) == sorted(by_id)
    assert stats.num_bins == len(batches) and stats.real_tokens == sum(lengths)
    assert 0 < stats.efficiency <= 1 and abs(stats.padding_pct - 100 * (1 - stats.efficiency)) < 1e-9


def test_best_fit_decreasing_known_case():
    bins = plan_bins([5, 4, 3, 3, 2, 2, 1], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 1, 6], [2, 3, 4, 5]]


def test_overlong_document_is_an_error():
    with pytest.raises(OverlongDocumentError, match="truncate.*raise max_tokens"):
        plan_bins([3, 11], 10)


def test_collate_single_doc_without_padding():
    rng = np.random.default_rng(0)
    doc = make_doc(rng, 7, "x")
    b = collate([doc])
    assert b.cu_seqlens.tolist() == [0, 7] and b.num_pad == 0 and b.max_seqlen == 7


@pytest.fixture(scope="module")
def tok():
    return load_shipped_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    r = Renderer(tok, BlockMaskingConfig(keep_last_n_blocks=0))
    with open(SAMPLE_TRACES, encoding="utf-8") as f:
        recs = [normalize_row(json.loads(line), i, "default") for i, line in enumerate(f)]
    return [r.render(x) for x in recs]


def test_pack_real_traces(examples):
    max_tokens = max(e.num_tokens for e in examples) + 10
    batches, stats = pack_examples(examples, max_tokens, pad_to=64)
    by_id = {
        e.record_id: {"input_ids": e.input_ids, "labels": e.labels, "kill_row": e.kill_row, "kinds": e.kinds}
        for e in examples
    }
    for b in batches:
        check_batch(b, by_id, max_tokens, 64)
    assert stats.num_docs == 3 and sum(len(b.record_ids) for b in batches) == 3
    # Trained targets: every response token (prompt excluded) is predicted once, from its predecessor.
    total_targets = sum(b.num_loss_tokens for b in batches)
    assert total_targets == sum(e.num_tokens - e.prompt_len for e in examples)


def _dataset_file(tmp_path, extra_bad=True):
    path = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in open(SAMPLE_TRACES, encoding="utf-8")]
    rows.append({"problem": "2+2?", "response": "<think>\n<|block_start|>add<|block_end|>\n</think>\n4"})
    rows.append(
        {
            "problem": "3+3?",
            "response": "<think>\n<|block_start|>add<|block_end|>\n<|summary_start|>added<|summary_end|>\n</think>\n6",
            "domain": "math",
        }
    )
    if extra_bad:
        rows.append({"problem": "no response"})
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _columns(ds):
    return {c: ds[c] for c in ds.column_names}


def test_cache_round_trip_and_fingerprint(tmp_path, tok, examples):
    path = _dataset_file(tmp_path)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_seq_len=8192)
    ds, report = prepare_dataset(cfg, tokenizer=tok)
    assert report.total == 6 and report.kept == 4
    assert report.dropped_by_reason == {"block_without_summary": 1, "missing_field": 1}
    assert ds.column_names == [
        "input_ids",
        "labels",
        "kinds",
        "kill_row",
        "prompt_len",
        "num_tokens",
        "record_id",
        "domain",
    ]
    for ex in examples:  # cached rows equal in-process rendering
        row = ds[ds["record_id"].index(ex.record_id)]
        assert row["input_ids"] == ex.input_ids.tolist() and row["labels"] == ex.labels.tolist()
        assert row["kinds"] == ex.kinds.tolist() and row["kill_row"] == ex.kill_row.tolist()
        assert row["prompt_len"] == ex.prompt_len and row["num_tokens"] == ex.num_tokens
    fp = cache_fingerprint(cfg, tok, "")
    prepared = os.path.join(str(tmp_path / "cache"), "memento-prepared")
    first = os.listdir(prepared)
    assert len(first) == 1 and all(
        f.startswith(os.path.join(prepared, first[0])) for f in (c["filename"] for c in ds.cache_files)
    )
    # Same inputs: cache reused (same file). Changed options or tokenizer: new fingerprint.
    ds2, _ = prepare_dataset(cfg, tokenizer=tok)
    assert ds2.cache_files[0]["filename"] == ds.cache_files[0]["filename"] and _columns(ds2) == _columns(ds)
    prepare_dataset(
        DataConfig(
            path=str(path),
            cache_dir=str(tmp_path / "cache"),
            max_seq_len=8192,
            block_masking=BlockMaskingConfig(keep_last_n_blocks=-1),
        ),
        tokenizer=tok,
    )
    assert len(os.listdir(prepared)) == 2
    other = load_shipped_tokenizer()
    other.chat_template = "{{ messages[0]['content'] }}"
    assert cache_fingerprint(cfg, other, "") != fp
    assert cache_fingerprint(DataConfig(path=str(path), system_prompt="hi"), tok, "") != cache_fingerprint(
        DataConfig(path=str(path)), tok, ""
    )


def test_num_proc_2_equals_num_proc_1(tmp_path, tok):
    path = _dataset_file(tmp_path)
    one, r1 = prepare_dataset(DataConfig(path=str(path), cache_dir=str(tmp_path / "c1"), num_proc=1), tokenizer=tok)
    two, r2 = prepare_dataset(DataConfig(path=str(path), cache_dir=str(tmp_path / "c2"), num_proc=2), tokenizer=tok)
    assert _columns(one) == _columns(two)
    assert r1.to_dict() == r2.to_dict()
