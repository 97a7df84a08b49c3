"""Recipes: YAML files of config sections, shipped in this package directory.

A recipe names its base recipes under ``defaults:`` (merged in order, then this file on top), so a
stage-2 recipe only states what differs from stage 1. ``recipe=NAME`` finds ``NAME.yaml`` here;
``recipe=path/to/file.yaml`` reads any file (its ``defaults`` may name shipped recipes or files next
to it). A recipe with ``stages: [a, b]`` is a pipeline: each stage runs in turn, the next one
initialised from the previous one's export (see :mod:`memento_train.sft.pipeline`).

Given the config class a recipe is for (``schema``), each file's deprecated option names are
replaced by the current ones *before* it is merged with its bases, so a renamed option given under
its old name still overrides the base recipe's value (see
:func:`memento_train.config.tree.canonical_tree`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from memento_train.config.errors import ConfigError
from memento_train.config.tree import canonical_tree, deep_merge, parse_overrides

RECIPE_DIR = Path(__file__).resolve().parent


def available_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str, relative_to: Path | None = None) -> Path:
    """The file for recipe ``name`` (a shipped name or a path); :class:`ConfigError` if there is none."""
    candidates = []
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        candidates.append(Path(os.path.expanduser(name)))
        if relative_to is not None:
            candidates.append(relative_to / name)
    else:
        if relative_to is not None:
            candidates.append(relative_to / f"{name}.yaml")
        candidates.append(RECIPE_DIR / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"unknown recipe {name!r}; shipped recipes: {', '.join(available_recipes())} (or pass a path to a .yaml file)"
    )


def load_recipe(
    name: str, *, schema: type | None = None, relative_to: Path | None = None, _seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The merged tree of recipe ``name`` (its ``defaults`` resolved; the key itself removed), each
    file's deprecated option names replaced when the config class ``schema`` is given."""
    path = recipe_path(name, relative_to)
    key = str(path.resolve())
    if key in _seen:
        raise ConfigError(f"recipe {name!r} includes itself through defaults: {' -> '.join(_seen + (key,))}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of config sections")
    bases = tree.pop("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(
            merged, load_recipe(str(base), schema=schema, relative_to=path.parent, _seen=_seen + (key,))
        )
    merged.pop("stages", None)  # a pipeline's stage list is not inherited by recipes built on it
    return deep_merge(merged, tree if schema is None else canonical_tree(schema, tree))


def split_recipe_arg(args: list[str]) -> tuple[str | None, list[str]]:
    """``["recipe=NAME", "a.b=1"]`` -> ``("NAME", ["a.b=1"])``: the recipe name and the overrides."""
    recipe, rest = None, []
    for a in args:
        if a.startswith("recipe="):
            recipe = a.split("=", 1)[1] or None
        else:
            rest.append(a)
    return recipe, rest


def recipe_tree(
    recipe: str, overrides: Sequence[str] | dict[str, Any] = (), *, schema: type | None = None
) -> dict[str, Any]:
    """The merged plain tree of ``recipe`` (a shipped name or a file) and the overrides on top of it
    (``key=value`` arguments, or an already nested mapping). A pipeline recipe keeps its ``stages``.
    With the config class ``schema``, deprecated option names are replaced in each recipe file and in
    the overrides before they are merged (so an old key on the command line still beats a recipe's)."""
    top = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    if schema is not None:
        top = canonical_tree(schema, top)
    return deep_merge(load_recipe(recipe, schema=schema), top)
