"""Checkpoints that load the same in transformers 4.56+ and 5.x, and a RoPE check for servers.

vLLM 0.13 (the Memento overlay's base) runs on transformers 4.x; memento-train saves with 5.x, which
writes names 4.x does not know:

- ``config.json`` keeps ``rope_theta`` only inside ``rope_parameters``; 4.x then fills its default
  (10000) and vLLM 0.13 serves e.g. Qwen3 (1e6) with the wrong RoPE and no error. 5.x writes ``dtype``
  where 4.x reads ``torch_dtype``.
- ``tokenizer_config.json`` names ``"tokenizer_class": "TokenizersBackend"``, a 5.x class; 4.x (and so
  vLLM 0.13) cannot load the tokenizer. 5.x maps ``PreTrainedTokenizerFast`` to the same class.

:func:`add_legacy_keys` writes the legacy keys beside the new ones (values equal, so 5.x loads the same
config); :func:`check_served_rope_theta` refuses a server whose loaded RoPE base differs from the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# transformers-5 tokenizer classes -> the 4.x class that loads the same tokenizer.json (5.x maps it back)
LEGACY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def rope_theta_of(config: Mapping[str, Any]) -> float | None:
    """The RoPE base a ``config.json`` dict declares (``rope_parameters`` first, then legacy ``rope_theta``)."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        # per-layer-type parameters (e.g. {"full_attention": {...}, "sliding_attention": {...}})
        full = params.get("full_attention")
        if isinstance(full, Mapping) and "rope_theta" in full:
            return float(full["rope_theta"])
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    return None


def legacy_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` plus the transformers-4 keys: top-level ``rope_theta`` (and ``rope_scaling`` for a
    non-default RoPE type) and ``torch_dtype``. Keys already present are left alone."""
    out = dict(config)
    params = config.get("rope_parameters")
    theta = rope_theta_of(config)
    if theta is not None and "rope_theta" not in out:
        out["rope_theta"] = theta
    if (
        isinstance(params, Mapping)
        and "rope_theta" in params
        and params.get("rope_type", "default") != "default"
        and out.get("rope_scaling") is None
    ):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if "torch_dtype" not in out and out.get("dtype") is not None:
        out["torch_dtype"] = out["dtype"]
    return out


def legacy_tokenizer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` with a tokenizer class transformers 4.x can import."""
    out = dict(config)
    cls = out.get("tokenizer_class")
    if cls in LEGACY_TOKENIZER_CLASSES:
        out["tokenizer_class"] = LEGACY_TOKENIZER_CLASSES[cls]
    return out


def add_legacy_keys(model_dir: str | os.PathLike) -> list[str]:
    """Rewrite ``config.json`` / ``tokenizer_config.json`` in ``model_dir`` with the transformers-4 keys
    (files that are absent are skipped); returns the files changed."""
    changed = []
    for name, convert in (("config.json", legacy_config), ("tokenizer_config.json", legacy_tokenizer_config)):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        new = convert(data)
        if new != data:
            path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
            changed.append(name)
    return changed


def loaded_rope_theta(hf_config: Any) -> float | None:
    """The RoPE base a loaded config object (transformers 4 or 5, after vLLM's patching) will use."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, Mapping):
        theta = rope_theta_of({"rope_parameters": params})
        if theta is not None:
            return theta
    theta = getattr(hf_config, "rope_theta", None)
    return None if theta is None else float(theta)


def check_served_rope_theta(model_dir: str | os.PathLike, hf_config: Any = None) -> None:
    """Raise ValueError if vLLM reads ``model_dir`` with another RoPE base than its ``config.json`` declares.

    ``hf_config``: the config object vLLM builds the model from; by default vLLM's own loader
    (``vllm.transformers_utils.config.get_config``, which applies vLLM's RoPE patching) reads it, before
    any weight is loaded. A directory without ``config.json`` is not checked.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return
    if hf_config is None:
        from vllm.transformers_utils.config import get_config

        hf_config = get_config(str(model_dir), trust_remote_code=False)
    declared = rope_theta_of(json.loads(path.read_text()))
    served = loaded_rope_theta(hf_config)
    if declared is None or served is None or math.isclose(declared, served, rel_tol=1e-9):
        return
    raise ValueError(
        f"{path}: declares RoPE base (rope_theta) {declared:g}, but vLLM reads {served:g} (transformers "
        f"{_transformers_version()}), so it would generate with the wrong positions. The file keeps "
        "rope_theta only inside rope_parameters (a transformers-5 config), which transformers 4.x does not "
        'read: add a top-level "rope_theta" (memento_train.export.compat.add_legacy_keys(model_dir) does it; '
        "memento-train exports write it)"
    )


def _transformers_version() -> str:
    try:
        import transformers

        return str(transformers.__version__)
    except ImportError:
        return "not installed"
