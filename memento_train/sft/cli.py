"""``memento-train``: supervised fine-tuning of Memento models.

Usage::

    memento-train                                   # embedded default: tiny model, synthetic data, CPU,
                                                    # stage 1 then stage 2, HF export at the end
    memento-train recipe=qwen3_8b_stage2 model.path=/ckpt/stage1/hf output_dir=/shared/run2
    memento-train recipe=tiny_stage1 train.max_steps=10 optim.lr=1e-3 logger=none
    memento-train export checkpoint=RUN/checkpoints/step_00000050 output=RUN/hf-step50
    memento-train recipes                           # list the shipped recipes
    memento-train show recipe=NAME [key=value ...]  # print the resolved config and exit

Overrides are ``section.option=value`` (values parsed as YAML). The whole config is validated before
any worker starts; errors name the option to change.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import yaml

from memento_train.config.errors import ConfigError
from memento_train.config.tree import parse_overrides, to_dict
from memento_train.recipes.cli import RecipeArgs, run_recipe_cli


def main(argv: Sequence[str] | None = None) -> int:
    return run_recipe_cli("memento-train", __doc__, argv, _train, subcommands={"export": _export})


def _export(args: list[str]) -> int:
    from memento_train.sft.driver import export_checkpoint

    opts = parse_overrides(args)
    ckpt, out = opts.pop("checkpoint", None), opts.pop("output", None)
    if not ckpt or not out:
        raise ConfigError("usage: memento-train export checkpoint=RUN/checkpoints/step_N output=DIR")
    print(export_checkpoint(str(ckpt), str(out), opts))
    return 0


def _train(args: RecipeArgs) -> int:
    from memento_train.sft.config import build_sft_config, config_tree

    show, overrides = args.show, args.overrides
    tree = config_tree(args.recipe, overrides)
    stages = tree.pop("stages", None)
    if stages:
        from memento_train.sft.pipeline import run_pipeline

        if show:
            print(yaml.safe_dump({"stages": stages, "overrides": parse_overrides(overrides)}, sort_keys=False))
            return 0
        results = run_pipeline(list(stages), parse_overrides(overrides))
        for r in results:
            print(
                f"[memento-train] {r.output_dir}: {r.steps} steps, final loss {r.final_loss:.4f}, HF model {r.hf_dir}"
            )
        return 0
    cfg = build_sft_config(tree)
    from memento_train.sft.driver import check_against_model, run_stage

    if show:
        try:
            check_against_model(cfg)  # what needs the model's config.json: rejected here, exit 2
        except OSError as exc:  # no config.json reachable from here (offline, gated hub model)
            print(
                f"memento-train: model checks skipped, cannot read the config of model.path={cfg.model.path!r}: {exc}",
                file=sys.stderr,
            )
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0

    r = run_stage(cfg)
    print(f"[memento-train] {r.output_dir}: {r.steps} steps, final loss {r.final_loss:.4f}, HF model {r.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
