"""Multi-stage SFT: a recipe with ``stages: [a, b, ...]`` runs each stage recipe in turn.

Stage k writes to ``<output_dir>/<stage recipe name>``; stage k+1 starts from stage k's Hugging Face
export (``model.path``). Command-line overrides apply to every stage. The embedded default is the
pipeline ``tiny``: stage 1 (full attention) then stage 2 (memento attention) on the synthetic task.
"""

from __future__ import annotations

import os
from typing import Any

from memento_train.config.errors import ConfigError
from memento_train.config.tree import deep_merge
from memento_train.recipes import load_recipe
from memento_train.sft.config import build_sft_config
from memento_train.sft.driver import StageResult, run_stage


def run_pipeline(stages: list[str], overrides: dict[str, Any], *, progress: bool = True) -> list[StageResult]:
    """Run ``stages`` (recipe names) in order, chaining each stage's export into the next."""
    if not stages or not all(isinstance(s, str) for s in stages):
        raise ConfigError(f"stages must be a non-empty list of recipe names, got {stages!r}")
    root = overrides.get("output_dir") or load_recipe(stages[0]).get("output_dir") or "runs/memento-sft"
    for k, name in enumerate(stages):  # validate every stage before any of them starts
        tree = deep_merge(load_recipe(name), overrides)
        if k:  # its model comes from the previous stage, which does not exist yet
            tree = deep_merge(tree, {"model": {"require_stage1_init": False, "init_from": None}})
        cfg = build_sft_config(tree)
        if k < len(stages) - 1 and not cfg.checkpoint.export_hf:
            raise ConfigError(
                "a pipeline stage must export its model for the next one: "
                "do not set checkpoint.export_hf=false on a multi-stage recipe"
            )
    results: list[StageResult] = []
    for name in stages:
        tree = deep_merge(load_recipe(name), overrides)
        tree["output_dir"] = os.path.join(os.path.abspath(os.path.expanduser(str(root))), os.path.basename(name))
        if results:
            tree = deep_merge(tree, {"model": {"path": results[-1].hf_dir}})
        cfg = build_sft_config(tree)
        results.append(run_stage(cfg, progress=progress))
    return results
