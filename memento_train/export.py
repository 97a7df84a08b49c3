"""Hugging Face export: safetensors weights, tokenizer with chat template, generation config and a
marker file describing the run, loadable by ``AutoModelForCausalLM.from_pretrained`` (transformers 4.56+
and 5.x alike, see :mod:`memento_train.hf_compat`) and vLLM."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from memento_train.hf_compat import add_legacy_keys
from memento_train.tokens import IM_END

MARKER_FILE = "memento_train.json"


def export_hf(state_dict: dict[str, torch.Tensor], config: Any, tokenizer: Any, out_dir: str | os.PathLike,
              *, info: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> str:
    """Write a servable HF model directory from full (unsharded) weights; returns ``out_dir``.

    ``config`` is the trained model's config (its attention implementation is reset to ``sdpa`` so the
    export loads without memento-train installed); weights are stored in ``dtype`` (bf16 by default,
    what serving uses; pass ``torch.float32`` to keep full precision). ``info`` (stage, step, mask
    options...) goes to ``memento_train.json``.
    """
    import transformers

    os.makedirs(out_dir, exist_ok=True)
    config = copy.deepcopy(config)
    config.use_cache = True
    config._attn_implementation = None
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    weights = {k: v.detach().to("cpu", dtype) for k, v in state_dict.items()}
    missing, unexpected = skeleton.load_state_dict(weights, strict=False, assign=True)
    tied = set(getattr(skeleton, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in missing if not (k in tied and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ValueError(f"export: weights do not match the model config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    skeleton.config.dtype = dtype
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    gen = transformers.GenerationConfig(
        eos_token_id=[im_end] if tokenizer.eos_token_id in (None, im_end) else [im_end, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.6, top_p=0.95,
    )
    skeleton.generation_config = gen
    skeleton.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    add_legacy_keys(out_dir)  # transformers 4.x (vLLM 0.13) reads rope_theta / torch_dtype / the tokenizer class
    with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)
    return str(out_dir)
