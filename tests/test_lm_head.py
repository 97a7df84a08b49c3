"""The fused, chunked LM head + cross-entropy (``memento_train/models/lm_head.py``) and how engines run it.

- fp64: log-probs, entropies and the SFT loss equal the plain ``logits -> log_softmax`` path, values
  and gradients, for any chunking, temperature, ignore-index and loss-mask pattern (hypothesis).
- memory: the SFT step keeps no ``[T, vocab]`` tensor for backward (saved-tensor hooks).
- sharded engines (FSDP2 ZeRO-2/3, DeepSpeed ZeRO-3; tied and untied heads) give the plain loss's
  gradients, although the head weight is whole only inside the head's forward.
"""

from __future__ import annotations

import engine_harness as H
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from memento_train.engines.head_stats import HeadRequest, TokenStats, TokenStatsFn, head_request, token_logprob_fn
from memento_train.models.lm_head import VocabShard, fused_token_logprobs
from memento_train.sft.losses import sft_loss_fn, token_loss_sum


def _plain(hidden, weight, labels, temperature=1.0):
    """The unfused reference: full logits, log_softmax, gather."""
    logp_all = F.log_softmax((hidden @ weight.T) / temperature, dim=-1)
    mask = labels != -100
    logp = torch.where(mask, logp_all.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent = torch.where(mask, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, ent


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 40),
    v=st.integers(2, 60),
    chunk=st.integers(1, 17),
    ignore=st.floats(0.0, 1.0),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    seed=st.integers(0, 2**16),
)
def test_fused_logprobs_and_entropy_equal_the_plain_head_in_fp64(t, v, chunk, ignore, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, 8, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (t,), generator=g)
    labels[torch.rand(t, generator=g) < ignore] = -100
    logp, ent = fused_token_logprobs(
        hidden, weight, labels, temperature=temperature, with_entropy=True, chunk_rows=chunk
    )
    ref_logp, ref_ent = _plain(hidden, weight, labels, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-12)
    w_lp, w_h = torch.randn(t, dtype=torch.float64, generator=g), torch.randn(t, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((logp * w_lp).sum() + (ent * w_h).sum(), (hidden, weight))
    ref = torch.autograd.grad((ref_logp * w_lp).sum() + (ref_ent * w_h).sum(), (hidden, weight))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # log-probs alone (no entropy): its own backward branch
    logp2, none = fused_token_logprobs(hidden, weight, labels, temperature=temperature, chunk_rows=chunk)
    assert none is None
    got = torch.autograd.grad((logp2 * w_lp).sum(), (hidden, weight))
    ref = torch.autograd.grad((_plain(hidden, weight, labels, temperature)[0] * w_lp).sum(), (hidden, weight))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_padding_rows_of_a_vocab_shard_are_not_tokens():
    # A head padded to 12 rows of which 9 are real tokens: the 3 pad rows take no probability mass.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(12, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3, 5, 1])
    logp, _ = fused_token_logprobs(hidden, weight, labels, shard=VocabShard(group=None, start=0, valid=9))
    ref, _ = _plain(hidden, weight[:9], labels)
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-12)
    (gw,) = torch.autograd.grad(logp.sum(), weight)
    assert gw[9:].abs().max() == 0


def _tiny_lm(family="qwen3", *, tied=False, dtype=torch.float64):
    from conftest import tiny_causal_lm

    from memento_train.attention import attn_implementation

    model = tiny_causal_lm(family, vocab_size=2048, dtype=dtype)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.set_attn_implementation(attn_implementation("segment"))
    return model.train()


def _forward_stats(model, mb, fn: TokenStatsFn) -> TokenStats:
    request = fn.request(mb)
    with head_request(model.get_output_embeddings(), request):
        out = model(
            input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
        )
    return TokenStats.unpack(out.logits[0], request)


def _logits(model, mb):
    return model(
        input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
    ).logits[0]


@pytest.mark.parametrize("family,tied", [("qwen3", False), ("qwen3", True), ("phi3", False), ("olmo3", False)])
def test_sft_loss_equals_the_plain_loss_normalised_by_global_tokens_in_fp64(family, tied):
    """Several micro-batches (one with a loss mask, one with no loss token at all), each divided by the
    loss tokens of the whole step, as sft/losses.py did with logits: same loss, same parameter gradients."""
    model = _tiny_lm(family, tied=tied)
    mbs = H.micro_batches(1, n=3)
    mbs[1].extras["loss_mask"] = torch.arange(mbs[1].num_tokens) % 3 != 0
    mbs[2].extras["labels"] = torch.full_like(mbs[2].extras["labels"], -100)
    effective = [torch.where(mb.extras.get("loss_mask", torch.tensor(True)), mb.extras["labels"], -100) for mb in mbs]
    denom = sum(int((lab != -100).sum()) for lab in effective) + 7  # the other ranks' tokens count too
    params = list(model.parameters())
    fused = plain = 0.0
    fused_grads = [torch.zeros_like(p) for p in params]
    plain_grads = [torch.zeros_like(p) for p in params]
    loss_fn = sft_loss_fn(denom, chunk_rows=5)
    for mb, labels in zip(mbs, effective):
        loss, metrics = loss_fn(_forward_stats(model, mb, loss_fn), mb)
        for acc, gr in zip(fused_grads, torch.autograd.grad(loss, params, allow_unused=True)):
            acc += 0 if gr is None else gr
        ref = token_loss_sum(_logits(model, mb), labels) / denom
        for acc, gr in zip(plain_grads, torch.autograd.grad(ref, params, allow_unused=True)):
            acc += 0 if gr is None else gr
        assert metrics["loss_sum"] == pytest.approx(float(ref) * denom, rel=1e-12, abs=1e-12)
        fused, plain = fused + float(loss), plain + float(ref)
    assert fused == pytest.approx(plain, rel=1e-13)
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")


def test_token_logprob_fn_gives_the_rl_logprobs_of_the_plain_head():
    from memento_train.rl.logprobs import token_logprobs

    model = _tiny_lm()
    mb = H.micro_batches(2, n=1)[0]
    with torch.no_grad():
        got = _forward_stats(model, mb, token_logprob_fn(temperature=0.6)).logprobs
        ref = token_logprobs(_logits(model, mb), mb.extras["labels"], temperature=0.6)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_head_request_leaves_the_plain_forward_alone():
    model = _tiny_lm()
    mb = H.micro_batches(3, n=1)[0]
    before = _logits(model, mb)
    _forward_stats(model, mb, sft_loss_fn(10))
    torch.testing.assert_close(_logits(model, mb), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="without bias"):
        with head_request(torch.nn.Linear(4, 8, bias=True), HeadRequest(torch.zeros(2, dtype=torch.long))):
            pass


# -- bytes saved for backward -------------------------------------------------------------------------
def _saved_bytes(run) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes of distinct non-parameter storages autograd saves while ``run()`` builds its graph."""
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values()), shapes


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sft_step_saves_no_vocab_sized_tensor_for_backward(one_rank_group):
    """Through the FSDP2 engine, the SFT loss saves only O(T·H) beyond the decoder itself; the plain
    logits loss (what sft/losses.py did) saves a full fp32 [T, vocab] log-softmax."""
    from memento_train.engines import EngineConfig, build_engine
    from memento_train.training.optim import OptimConfig

    mb = H.micro_batches(1, n=1)[0]
    n_tok, tokens = mb.num_tokens, int((mb.extras["labels"] != -100).sum())
    decoder = H.tiny_model()
    vocab, hidden = decoder.config.vocab_size, decoder.config.hidden_size
    base, _ = _saved_bytes(
        lambda: decoder.model(
            input_ids=mb.input_ids[None], position_ids=mb.position_ids[None], memento_meta=mb.meta, use_cache=False
        )
    )
    engine = build_engine(H.tiny_model(), OptimConfig(), EngineConfig(kind="fsdp2"), torch.device("cpu"))
    fused, shapes = _saved_bytes(lambda: engine.forward_backward([mb], sft_loss_fn(tokens)))
    assert not [s for s in shapes if vocab in s], f"a vocabulary-sized tensor was saved: {shapes}"
    # the final hidden states (fp32 [T, H]) and a few numbers per token, nothing per vocabulary entry
    assert fused - base <= n_tok * hidden * 4 + 64 * n_tok, (fused, base)
    plain, _ = _saved_bytes(lambda: engine.forward_backward([mb], H.token_loss_fn(tokens)))
    assert plain - base >= n_tok * vocab * 4  # the measurement sees what the fused head avoids


# -- sharded engines, two ranks ----------------------------------------------------------------------------
def _rank_share(rank, world_size):
    mbs = H.micro_batches(1)
    per = len(mbs) // world_size
    return mbs, mbs[rank * per : (rank + 1) * per]


def sharded_grads_job(rank: int, world_size: int, configs: list) -> dict:
    """Per (kind, stage, tied): full gradients of the fused SFT loss and of the plain logits loss."""
    from memento_train.engines import EngineConfig, build_engine
    from memento_train.training.optim import OptimConfig

    out = {}
    for kind, stage, tied in configs:
        grads = {}
        for name, make_loss in (("fused", sft_loss_fn), ("plain", H.token_loss_fn)):
            model = H.tiny_model() if tied else _tiny_lm(tied=False, dtype=torch.float32)
            engine = build_engine(model, OptimConfig(), EngineConfig(kind=kind, zero_stage=stage), torch.device("cpu"))
            everything, mine = _rank_share(rank, world_size)
            metrics = engine.forward_backward(mine, make_loss(H.num_loss_tokens(everything)))
            grads[name] = (engine.full_grads(), sum(m["loss_sum"] for m in metrics))
            del engine
        out[(kind, stage, tied)] = grads
    return out


def _assert_same_grads(result):
    (fused, fused_loss), (plain, plain_loss) = result["fused"], result["plain"]
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    assert set(fused) == set(plain)
    for name, g in plain.items():
        torch.testing.assert_close(
            fused[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()) + 1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )


FSDP2_CONFIGS = [("fsdp2", 2, True), ("fsdp2", 3, True), ("fsdp2", 3, False)]


@pytest.fixture(scope="module")
def fsdp2_two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_fsdp2")
    return H.run_ranks(sharded_grads_job, 2, (FSDP2_CONFIGS,), str(out))


@pytest.mark.parametrize("config", FSDP2_CONFIGS, ids=lambda c: f"{c[0]}-zero{c[1]}-{'tied' if c[2] else 'untied'}")
def test_fused_sft_loss_under_fsdp2_gives_the_plain_gradients(fsdp2_two_ranks, config):
    _assert_same_grads(fsdp2_two_ranks[config])


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fused_sft_loss_under_deepspeed_zero3_gives_the_plain_gradients(tmp_path, tied):
    config = ("deepspeed", 3, tied)
    result = H.run_ranks(sharded_grads_job, 2, ([config],), str(tmp_path))
    _assert_same_grads(result[config])
