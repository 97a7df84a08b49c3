"""``memento-rl``: reinforcement learning (CISPO / GRPO) of Memento models on block-evicting rollouts.

Usage::

    memento-rl                                   # embedded default (recipe tiny_rl): tiny model, SFT
                                                 # warm-up, then RL on the synthetic task, CPU
    memento-rl output_dir=/tmp/rl train.total_steps=20
    memento-rl recipe=grpo                       # the paper's run, from runs/qwen3_8b_stage2/hf (the
                                                 # default output of memento-train recipe=qwen3_8b_stage2)
    memento-rl recipe=grpo model.path=/ckpt/stage2/hf prompts.path=/data/rl.jsonl output_dir=/shared/rl
    memento-rl recipes                           # list the shipped recipes
    memento-rl show recipe=NAME [key=value ...]  # print the resolved config and exit

Overrides are ``section.option=value`` (values parsed as YAML). ``resume=auto`` (the default)
continues from the newest checkpoint in ``output_dir`` with the same data order. Metrics go to
``<output_dir>/metrics.jsonl`` (one record per step, ``reward_mean`` among them) and wandb.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import yaml

from memento_train.config.tree import to_dict
from memento_train.recipes.cli import RecipeArgs, run_recipe_cli


def main(argv: Sequence[str] | None = None) -> int:
    return run_recipe_cli("memento-rl", __doc__, argv, _run)


def _run(args: RecipeArgs) -> int:
    from memento_train.rl.config import build_rl_config, config_tree

    cfg = build_rl_config(config_tree(args.recipe, args.overrides))
    if args.show:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from memento_train.pipelines.rl_warmup import warm_up_then_run_rl

    result = warm_up_then_run_rl(cfg)
    r = result.reward_means
    print(
        f"[memento-rl] {result.output_dir}: {result.steps} steps; mean reward first/last step "
        f"{r[0] if r else float('nan'):.3f} -> {r[-1] if r else float('nan'):.3f}; HF model {result.hf_dir}"
    )
    return 0


# Reward workers are spawned processes that re-import __main__: the guard keeps them from training.
if __name__ == "__main__":
    sys.exit(main())
