"""Typed configs from YAML recipes and ``key=value`` overrides (OmegaConf-style, no dependency).

A config is a tree of dataclasses. :func:`build` turns a nested mapping into that tree, checking every
key and type and naming the dotted option in each error; :func:`parse_overrides` turns CLI arguments
such as ``optim.lr=1e-4 train.max_steps=10`` into a nested mapping; :func:`deep_merge` layers recipes
and overrides. Values are parsed as YAML, so ``x=null``, ``x=[1,2]`` and ``x=true`` work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from memento_train.config_errors import ConfigError


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; raises :class:`ConfigError` on bad syntax."""
    tree: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"argument {arg!r} is not an override; write key=value, e.g. optim.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. a path with ':'): keep the text
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` layered over ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def has_key(tree: Mapping[str, Any], dotted: str) -> bool:
    """Whether ``tree`` sets the dotted option (used to insist that recipes set some keys explicitly)."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def build(cls: type, values: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values``, recursively, with type checks.

    Unknown keys raise :class:`ConfigError` listing the accepted ones; a class with a ``from_dict``
    classmethod builds itself. ``validate(prefix)`` is *not* called here: the caller validates the
    whole tree once it is built, so cross-field checks see final values.
    """
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of options, got {values!r}")
    if hasattr(cls, "from_dict"):  # e.g. DataConfig: it knows its own nested options
        try:
            return cls.from_dict(dict(values))
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from exc
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{prefix} " if prefix else ""
        raise ConfigError(f"unknown {where}option(s) {unknown}; accepted: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, _join(prefix, name))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for logging, ``config.yaml`` and wandb)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        item_types = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [Any] * len(value)
        return tuple(_coerce(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
