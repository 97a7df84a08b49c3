"""Typed configs from YAML recipes and ``key=value`` overrides: the one config system of every CLI.

A config is a tree of dataclasses. :func:`build` turns a nested mapping into that tree, checking every
key and type and naming the dotted option in each error; :func:`parse_overrides` turns CLI arguments
such as ``optim.lr=1e-4 train.max_steps=10`` into a nested mapping; :func:`deep_merge` layers recipes
and overrides. SFT, RL, ``memento-eval``, the data pipeline and the launcher all build their options
here, so one input gets one answer everywhere.

The rules, for every option of every tree:

- values are YAML (``x=null``, ``x=[1,2]``, ``x=1e-4``); on the command line only ``true``/``false``
  are booleans (YAML 1.2), so ``system_prompt=yes`` is the text ``yes``; ``null``, ``~`` and ``none``
  clear an optional option;
- ``bool`` options take ``true``/``false`` only (``1`` is an error), ``int`` options integers (``2.0``
  is 2), ``float`` options numbers (``1e-4`` too), ``str`` options text or numbers;
- a choice is typed ``Literal[...]`` and checked here (``engine.kind must be one of fsdp2, ...``);
  code that needs the choices as a tuple derives it with ``typing.get_args``;
- a list option also takes one value or comma-separated values (``k=1,2,4`` is ``[1, 2, 4]``);
- an unknown key is an error naming the dotted key, the closest valid one and every valid key there;
- a renamed option keeps its old name as a deprecated alias (``field(metadata=renamed_from("old"))``):
  the old key still works with a :class:`DeprecationWarning`, and giving both with different values
  is an error.

Cross-field rules live in each config's ``validate(prefix)``, which first calls :func:`check_types`
(the same type rules for a config built in Python rather than from a mapping).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from memento_train.config.errors import ConfigError


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; raises :class:`ConfigError` on bad syntax."""
    tree: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"argument {arg!r} is not an override; write key=value, e.g. optim.lr=1e-4")
        value = parse_value(raw)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def parse_value(raw: str) -> Any:
    """One command-line value as YAML, except that only ``true``/``false`` are booleans (YAML 1.2:
    ``yes``, ``no``, ``on``, ``off`` stay text) and text that is not YAML (``a: b``) stays text."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        return raw
    return value


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


def renamed_from(*old_names: str) -> dict[str, tuple[str, ...]]:
    """``field(metadata=renamed_from("mask"))``: the option's deprecated old names, still accepted."""
    return {_ALIASES: old_names}


def build(cls: type, values: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values``, recursively, with type checks.

    Unknown keys raise :class:`ConfigError` naming the dotted key and the accepted ones; deprecated
    names are renamed (with a :class:`DeprecationWarning`). ``validate(prefix)`` is *not* called here:
    the caller validates the whole tree once it is built, so cross-field checks see final values.
    """
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of options, got {values!r}")
    values = _rename_deprecated(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    known = options_of(cls)
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(unknown_options_message(unknown, sorted(known), prefix))
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, _join(prefix, name))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def options_of(cls: type) -> list[str]:
    """The option names of dataclass ``cls`` (fields set at init whose names do not start with ``_``)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def unknown_options_message(unknown: Sequence[str], known: Sequence[str], prefix: str = "") -> str:
    """``unknown option train.shufle (did you mean train.shuffle?); valid options of train: ...``."""
    dotted = [_join(prefix, k) for k in unknown]
    close = {key: difflib.get_close_matches(key, known, n=1) for key in unknown}
    hints = [
        _join(prefix, match[0]) if len(unknown) == 1 else f"{_join(prefix, key)} -> {_join(prefix, match[0])}"
        for key, match in close.items()
        if match
    ]
    where = f"of {prefix}" if prefix else "at the top level"
    return (
        f"unknown option{'s' if len(dotted) > 1 else ''} {', '.join(dotted)}"
        + (f" (did you mean {'; '.join(hints)}?)" if hints else "")
        + f"; valid options {where}: {', '.join(known)}"
    )


def canonical_tree(cls: type, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` with every deprecated option name of the ``cls`` tree replaced by its current name
    (one :class:`DeprecationWarning` each), so code that inspects the tree sees one spelling."""
    out = _rename_deprecated(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    for name, value in list(out.items()):
        sub = _dataclass_in(hints.get(name))
        if sub is not None and isinstance(value, Mapping):
            out[name] = canonical_tree(sub, value, _join(prefix, name))
    return out


def check_types(obj: Any, prefix: str = "") -> None:
    """Check the fields of a built dataclass against their types with :func:`build`'s rules
    (``Literal`` choices, strict bool/int/float, nested configs); raise :class:`ConfigError` naming
    the first bad option. For configs constructed in Python, whose values no builder has checked."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name.startswith("_"):
            continue
        value = getattr(obj, f.name)
        where = _join(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, where)
        else:
            _coerce(hints[f.name], value, where)


def describe_options(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted option, default)`` for every option of the ``cls`` tree (for ``--help``)."""
    out = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for name in options_of(cls):
        value = getattr(default, name)
        if dataclasses.is_dataclass(_dataclass_in(hints[name])) and dataclasses.is_dataclass(value):
            out.extend(describe_options(type(value), _join(prefix, name)))
        else:
            out.append((_join(prefix, name), value))
    return out


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for logging, ``config.yaml`` and wandb)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


_ALIASES = "deprecated_names"
_NULL_WORDS = ("null", "none", "~")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass of an option typed ``C`` or ``C | None`` (else None)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _rename_deprecated(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(values)
    for f in dataclasses.fields(cls):
        for old in f.metadata.get(_ALIASES, ()):
            if old not in out:
                continue
            old_key, new_key = _join(prefix, old), _join(prefix, f.name)
            warnings.warn(f"option {old_key} is deprecated; use {new_key}", DeprecationWarning, stacklevel=4)
            value = out.pop(old)
            if f.name not in out:
                out[f.name] = value
            elif isinstance(value, Mapping) and isinstance(out[f.name], Mapping):
                out[f.name] = deep_merge(value, out[f.name])
            elif value != out[f.name]:
                raise ConfigError(
                    f"{old_key}={value!r} (deprecated) contradicts {new_key}={out[f.name]!r}; set {new_key} only"
                )
    return out


def _choices(args: Sequence[Any]) -> str:
    return ", ".join(str(a) for a in args)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL_WORDS)):
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
    if origin is Literal:
        # bool is an int: ``True`` is not the choice ``1``.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{where} must be one of {_choices(args)}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, where)
    if origin in (tuple, list):
        value = _as_list(value, args[0] if args and (origin is list or args[-1] is Ellipsis) else None)
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
    if tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
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
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _as_list(value: Any, item: Any) -> Any:
    """A list option given one scalar (``k=4``) or comma-separated text (``k=1,2,4``) as a list."""
    if isinstance(value, (list, tuple)) or item is None or isinstance(value, Mapping) or value is None:
        return value
    if item is not str and isinstance(value, str) and "," in value:
        return [parse_value(part.strip()) for part in value.strip().strip("[]").split(",") if part.strip()]
    if item is str and isinstance(value, str) and "," in value:
        return [part.strip() for part in value.split(",") if part.strip()]
    return [value]
