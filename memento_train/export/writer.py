"""Hugging Face export: safetensors weights, tokenizer with chat template, generation config and a
marker file describing the run, loadable by ``AutoModelForCausalLM.from_pretrained`` (transformers 4.56+
and 5.x alike, see :mod:`memento_train.export.compat`) and vLLM.

The marker (``memento_train.json``) always records the eviction rule the model was trained with
(``block_masking``: :meth:`~memento_train.masking.BlockMaskingConfig.rule_dict`; exports written before the
two mask configs became one call it ``mask``, which is still read). RL rollouts, ``memento-eval`` and
``memento-serve`` read it (:func:`exported_mask`) and default their block masking to it, and a generation
config that contradicts it is refused unless the user says the mismatch is intended
(:func:`apply_exported_mask`): a Phi-4 stage-2 model (``mask_delimiters=true``) must not be served with
``mask_delimiters=false``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from memento_train.export.compat import add_legacy_keys
from memento_train.masking import BlockMaskingConfig
from memento_train.tokens import IM_END

MARKER_FILE = "memento_train.json"
# The options of the eviction rule itself (serving-only options such as max_block_tokens are not).
MASK_RULE_FIELDS = ("keep_last_n_blocks", "mask_delimiters", "keep_last_block_for_answer")


def export_hf(
    state_dict: dict[str, torch.Tensor],
    config: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    info: dict[str, Any],
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Write a servable HF model directory from full (unsharded) weights; returns ``out_dir``.

    ``state_dict`` is consumed (emptied) while the weights are converted to ``dtype``.

    ``config`` is the trained model's config (its attention implementation is reset to ``sdpa`` so the
    export loads without memento-train installed); weights are stored in ``dtype`` (bf16 by default,
    what serving uses; pass ``torch.float32`` to keep full precision). ``info`` (stage, step, mask
    options...) goes to ``memento_train.json``; it must hold ``block_masking``, the eviction rule the
    weights were trained with (a :class:`~memento_train.masking.BlockMaskingConfig` or its fields;
    ``mask`` is its old name).
    """
    import transformers

    info = dict(info)
    info["block_masking"] = _rule_fields(info.pop("block_masking", None) or info.pop("mask", None))
    os.makedirs(out_dir, exist_ok=True)
    config = copy.deepcopy(config)
    config.use_cache = True
    config._attn_implementation = None
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    # Converted tensor by tensor, each fp32 original released as soon as its copy exists (the caller
    # hands over ``state_dict``): the host holds one full copy plus one tensor, not two full copies.
    weights = {}
    for k in list(state_dict):
        weights[k] = state_dict.pop(k).detach().to("cpu", dtype)
    missing, unexpected = skeleton.load_state_dict(weights, strict=False, assign=True)
    tied = set(getattr(skeleton, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in missing if not (k in tied and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ValueError(
            f"export: weights do not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if getattr(config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    skeleton.config.dtype = dtype
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    gen = transformers.GenerationConfig(
        eos_token_id=[im_end] if tokenizer.eos_token_id in (None, im_end) else [im_end, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
    )
    skeleton.generation_config = gen
    skeleton.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    add_legacy_keys(out_dir)  # transformers 4.x (vLLM 0.13) reads rope_theta / torch_dtype / the tokenizer class
    with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)
    return str(out_dir)


def _rule_fields(mask: Any) -> dict[str, Any]:
    if mask is None:
        raise ValueError(
            "export: info['block_masking'] is required: every export records the eviction rule "
            "its weights were trained with (RL, memento-eval and memento-serve default to it)"
        )
    if not isinstance(mask, BlockMaskingConfig):
        mask = _masking_from_fields(mask)
    return mask.rule_dict()


def _masking_from_fields(fields: Any) -> BlockMaskingConfig:
    known = {f.name for f in dataclasses.fields(BlockMaskingConfig)}
    return BlockMaskingConfig(**{k: v for k, v in dict(fields).items() if k in known})


def read_export_info(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The ``memento_train.json`` of the export at ``path``, or ``None`` when there is none (a hub
    name, a model not exported by memento-train)."""
    if path is None:
        return None
    marker = Path(os.path.expanduser(str(path))) / MARKER_FILE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def exported_mask(path: str | os.PathLike | None) -> BlockMaskingConfig | None:
    """The eviction rule the export at ``path`` was trained with, ``None`` when unknown."""
    info = read_export_info(path) or {}
    rule = info.get("block_masking", info.get("mask"))  # "mask": exports written before the rename
    if not isinstance(rule, dict):
        return None
    return _masking_from_fields(rule).rule()


def apply_exported_mask(serving: Any, exported: BlockMaskingConfig, given: Iterable[str]) -> tuple[Any, list[str]]:
    """``serving`` (a :class:`~memento_train.masking.BlockMaskingConfig`) with every rule
    field not in ``given`` (the options the user set) taken from ``exported``, and one description per
    field the user set to something else than the model was trained with (``[]`` when they agree).
    ``enable=false`` counts as ``keep_last_n_blocks=-1``."""
    given = set(given)
    fill = {k: getattr(exported, k) for k in MASK_RULE_FIELDS if k not in given}
    if "keep_last_n_blocks" in fill and "enable" not in given:  # the overlay's way to say "never evict"
        fill["enable"] = exported.keep_last_n_blocks >= 0
        fill["keep_last_n_blocks"] = max(exported.keep_last_n_blocks, 0)
    out = dataclasses.replace(serving, **fill)
    effective = out.rule()
    mismatches = [
        f"{k}={getattr(effective, k)!r} (the model: {getattr(exported, k)!r})"
        for k in MASK_RULE_FIELDS
        if getattr(effective, k) != getattr(exported, k)
    ]
    return out, mismatches
