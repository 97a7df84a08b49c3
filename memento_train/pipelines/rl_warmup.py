"""The RL default's SFT warm-up: a short SFT stage that turns a random tiny model into a policy that
already writes the Memento format, then RL from its export (``warmup.*``, the embedded ``memento-rl``).

The warm-up is an ordinary SFT stage (``tiny_stage2`` with the RL run's model shape, eviction rule and
lengths) on the RL task's synthetic traces, written to ``<output_dir>/sft_warmup``; its export is
reused when it exists, so a resumed RL run does not train it again.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from memento_train.config.tree import deep_merge, to_dict
from memento_train.data.synthetic import synthetic_records
from memento_train.export.writer import MARKER_FILE
from memento_train.recipes import load_recipe
from memento_train.rl.config import RLConfig
from memento_train.rl.driver import WARMUP_DATA_SEED_OFFSET, RLResult, run_rl
from memento_train.sft.config import build_sft_config
from memento_train.sft.driver import run_stage


def warmup_records(cfg: RLConfig) -> list[dict]:
    """The warm-up's SFT traces: the RL task's generator, its own seed, the sloppy teacher's rate."""
    w = cfg.warmup
    task = replace(
        cfg.prompts.synthetic,
        seed=cfg.prompts.synthetic.seed + WARMUP_DATA_SEED_OFFSET,
        unboxed_answer_rate=w.unboxed_answer_rate,
    )
    return synthetic_records(w.num_records, task)


def warmup_stage_tree(cfg: RLConfig, out: Path, data: Path) -> dict[str, Any]:
    """The SFT stage config of the warm-up (``tiny_stage2`` + the RL run's model, mask and lengths)."""
    w = cfg.warmup
    return deep_merge(
        load_recipe("tiny_stage2"),
        {
            "output_dir": str(out),
            "logger": "none",
            "resume": "auto",
            "model": {
                "path": None,
                "require_stage1_init": False,
                "tiny": to_dict(cfg.model.tiny),
                "attn_backend": cfg.model.attn_backend,
            },
            "data": {
                "path": str(data),
                "max_seq_len": cfg.prompts.max_prompt_len + cfg.rollout.max_new_tokens,
                "block_masking": {
                    "keep_last_n_blocks": cfg.rollout.block_masking.keep_last_n_blocks,
                    "mask_delimiters": cfg.rollout.block_masking.mask_delimiters,
                },
            },
            "optim": {"lr": w.lr, "warmup_ratio": 0.05, "min_lr_ratio": 0.1},
            "train": {
                "epochs": w.steps * w.global_batch_size / w.num_records,
                "max_steps": w.steps,
                "global_batch_size": w.global_batch_size,
                "micro_batch_tokens": 1024,
                "seed": cfg.seed,
            },
            "cluster": {"use_ray": False, "num_workers": 1, "cpus_per_worker": cfg.cluster.cpus_per_worker},
            "checkpoint": {"every": 0, "keep_last": 1, "export_hf": True},
        },
    )


def sft_warmup(cfg: RLConfig, *, progress: bool = True) -> str:
    """Run (or reuse) the short SFT warm-up; returns its Hugging Face export directory."""
    out = Path(cfg.output_dir) / "sft_warmup"
    hf = out / "hf"
    if (hf / MARKER_FILE).is_file():
        return str(hf)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in warmup_records(cfg)))
    result = run_stage(build_sft_config(warmup_stage_tree(cfg, out, data)), progress=progress)
    return str(result.hf_dir)


def warm_up_then_run_rl(cfg: RLConfig, *, progress: bool = True) -> RLResult:
    """``memento-rl``: with ``warmup.enabled``, the warm-up first (its export becomes ``model.path``),
    then :func:`~memento_train.rl.driver.run_rl`."""
    if cfg.warmup.enabled:
        cfg.model.path = sft_warmup(cfg, progress=progress)
    return run_rl(cfg, progress=progress)
