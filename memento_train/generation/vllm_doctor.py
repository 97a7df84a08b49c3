"""``memento-vllm doctor``: is the installed vLLM ready for Memento rollouts and serving? One table.

Checks, in order (each row says ok / FAIL / skip and why):

1. vLLM version (0.13.x for the overlay path), platform (cpu/gpu), transformers version;
2. the Memento overlay is applied (its block-masking modules import);
3. this project's patch layer imports (:mod:`memento_train.generation.vllm_overlay_patches`);
4. the model's RoPE base as vLLM reads it equals its ``config.json`` (transformers-4 readers miss a
   RoPE base kept only in ``rope_parameters``), and its tokenizer loads with the memento tokens atomic;
5. a short parity run (``--parity-tokens`` per prompt, 2 prompts, greedy, eviction on, fp32): vLLM
   through :class:`~.vllm_engine.VLLMEngine` vs :class:`~.reference.ReferenceGenerator` — token ids,
   max |Δ log-prob|, evictions and the engine-measured physical KV length per step. This also proves
   the patches are live inside the engine (the KV trace comes from the engine's own log).

``model=PATH`` picks the model (default: the warmed tiny policy of a source checkout,
``tests/assets/tiny_rl_warmed``). Exit code 0 when every row is ok or skipped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memento_train.generation import vllm_overlay

TINY_POLICY = Path(__file__).resolve().parents[2] / "tests" / "assets" / "tiny_rl_warmed"


@dataclass
class Row:
    check: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str


def _version_rows(st: vllm_overlay.OverlayStatus) -> list[Row]:
    ok_version = st.vllm_version is not None and vllm_overlay.applies(st.vllm_version)
    return [
        Row(
            "vLLM version",
            "ok" if ok_version else "FAIL",
            f"{st.vllm_version or 'not importable'} (overlay path: 0.13.x)",
        ),
        Row(
            "platform / transformers",
            "ok" if st.transformers_version else "FAIL",
            f"{st.platform} / transformers {st.transformers_version}",
        ),
        Row(
            "Memento overlay applied",
            "ok" if st.overlay else "FAIL",
            "vllm.config.block_masking present" if st.overlay else f"missing: {vllm_overlay.INSTALL_COMMAND}",
        ),
        Row("memento_train patch layer", "ok" if st.patches.startswith("importable") else "FAIL", st.patches),
    ]


def _model_rows(model: Path) -> list[Row]:
    from memento_train.export.compat import check_served_rope_theta, loaded_rope_theta

    rows = []
    try:
        from vllm.transformers_utils.config import get_config

        cfg = get_config(str(model), trust_remote_code=False)
        check_served_rope_theta(model, cfg)
        rows.append(Row("RoPE base as vLLM reads it", "ok", f"rope_theta {loaded_rope_theta(cfg):g} == config.json"))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        rows.append(Row("RoPE base as vLLM reads it", "FAIL", f"{type(exc).__name__}: {exc}"))
    try:
        from memento_train.models.loading import load_tokenizer
        from memento_train.tokens import special_token_ids

        tok = load_tokenizer(model, add_memento_tokens=False)
        ids = special_token_ids(tok)
        rows.append(Row("tokenizer readable", "ok", f"{type(tok).__name__}, {len(ids)} memento/ChatML ids atomic"))
    except Exception as exc:  # noqa: BLE001
        rows.append(Row("tokenizer readable", "FAIL", f"{type(exc).__name__}: {exc}"))
    return rows


def task_prompts(model: Path, num: int) -> tuple[Any, Any, list[list[int]]]:
    """The RL default's config for ``model``, its tokenizer and the first ``num`` task prompts (token ids,
    chat template included): what the parity checks generate from."""
    from memento_train.models.loading import load_tokenizer
    from memento_train.rl.config import build_rl_config, config_tree
    from memento_train.rl.driver import encode_prompts, load_problems

    cfg = build_rl_config(
        config_tree(None, ["logger=none", "output_dir=unused", f"model.path={model}", "warmup.enabled=false"])
    )
    tok = load_tokenizer(model, add_memento_tokens=False)
    p = cfg.prompts
    _, prompts = encode_prompts(
        load_problems(p, synthetic_task=p.synthetic, num=num), tok, p.max_prompt_len, p.system_prompt
    )
    return cfg, tok, prompts


def parity_row(model: Path, tokens: int) -> Row:
    """Greedy, eviction on, fp32: VLLMEngine vs ReferenceGenerator on two task prompts."""
    from memento_train.generation.engine import SamplingParams
    from memento_train.generation.reference import ReferenceGenerator, SequenceRequest
    from memento_train.generation.vllm_engine import VLLMEngine
    from memento_train.models.config import ModelConfig
    from memento_train.models.loading import load_model

    cfg, tok, prompts = task_prompts(model, 2)
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    reqs = [SequenceRequest(q, prompt_index=i) for i, q in enumerate(prompts)]
    t0 = time.perf_counter()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = VLLMEngine(
        model, cfg.rollout.block_masking, dtype="float32", max_model_len=512, enforce_eager=True, seed=0
    )
    t1 = time.perf_counter()
    try:
        live = engine.llm.collective_rpc("memento_patch_version")  # the worker extension answers per worker
        got = engine.run(reqs, params)
    finally:
        core = getattr(getattr(engine.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
    t2 = time.perf_counter()
    ref = ReferenceGenerator(
        load_model(ModelConfig(path=str(model)), tok, seed=0, training=False), tok, cfg.rollout.block_masking
    )
    want = ref.run(reqs, params)
    same = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
    lp = max(
        (abs(a - b) for g, w in zip(got, want) if g.token_ids == w.token_ids for a, b in zip(g.logprobs, w.logprobs)),
        default=float("nan"),
    )
    ev_g = [[tuple(e) for e in g.extra.get("evictions", [])] for g in got]
    ev_w = [[tuple(e) for e in w.extra["evictions"]] for w in want]
    kv = all(g.extra.get("kv_trace") == "engine" and g.kv_trace == w.kv_trace for g, w in zip(got, want))
    ok = same == len(prompts) and lp < 1e-4 and ev_g == ev_w and kv and bool(live)
    n_ev = sum(len(e) for e in ev_w)
    detail = (
        f"patches v{live[0]} live in {len(live)} engine worker(s); tokens {same}/{len(prompts)} equal, "
        f"max|dlogprob| {lp:.1e}, evictions "
        f"{'equal' if ev_g == ev_w else 'DIFFER'} ({n_ev}), engine KV trace {'equal' if kv else 'DIFFERS'}; "
        f"engine start {t1 - t0:.0f} s, generate {t2 - t1:.1f} s"
    )
    return Row("parity vs ReferenceGenerator", "ok" if ok else "FAIL", detail)


def render(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check'.ljust(width)}  status  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r.check.ljust(width)}  {r.status.ljust(6)}  {r.detail}" for r in rows]
    return "\n".join(lines)


def doctor(model: Path | None, *, parity: bool = True, parity_tokens: int = 96) -> list[Row]:
    """Every row of the report (see the module docstring)."""
    st = vllm_overlay.status()
    rows = _version_rows(st)
    if model is None or not (model / "config.json").is_file():
        rows.append(Row("model checks", "skip", f"no model directory ({model}); pass model=PATH"))
        return rows
    rows += _model_rows(model)
    if not parity:
        rows.append(Row("parity vs ReferenceGenerator", "skip", "--no-parity"))
    elif any(r.status == "FAIL" for r in rows):
        rows.append(Row("parity vs ReferenceGenerator", "skip", "fix the failures above first"))
    else:
        try:
            rows.append(parity_row(model, parity_tokens))
        except Exception as exc:  # noqa: BLE001 - the table is the output
            rows.append(Row("parity vs ReferenceGenerator", "FAIL", f"{type(exc).__name__}: {exc}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="memento-vllm", description="Check an installed vLLM for Memento rollouts.")
    sub = ap.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help=__doc__.splitlines()[0])
    doc.add_argument("overrides", nargs="*", help="model=PATH (default: the warmed tiny policy of a checkout)")
    doc.add_argument("--no-parity", action="store_true", help="skip the short parity run")
    doc.add_argument("--parity-tokens", type=int, default=96, help="new tokens per prompt in the parity run")
    args = ap.parse_args(argv)
    model = TINY_POLICY if TINY_POLICY.is_dir() else None
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if key != "model" or not sep:
            ap.error(f"unknown argument {item!r}: only model=PATH is accepted")
        model = Path(value)
    rows = doctor(model, parity=not args.no_parity, parity_tokens=args.parity_tokens)
    print(render(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
