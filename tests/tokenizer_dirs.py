"""Tokenizer directories for tests, written offline from the shipped tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memento_train.models.shipped_tokenizer import shipped_tokenizer_path
from memento_train.tokens import MEMENTO_TOKENS


def base_tokenizer_without_memento_tokens(dst: Path) -> Path:
    """The shipped tokenizer minus the four memento tokens (``<think>`` kept): what a base model such as
    Qwen/Qwen3-8B ships before memento-train extends it."""
    shutil.copytree(shipped_tokenizer_path(), dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in MEMENTO_TOKENS]
    for t in MEMENTO_TOKENS:
        tj["model"]["vocab"].pop(t, None)
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def tokenizer_with_other_template(dst: Path) -> Path:
    """The shipped tokenizer with another chat template: same vocabulary, different rendered prompts."""
    shutil.copytree(shipped_tokenizer_path(), dst)
    template = dst / "chat_template.jinja"
    template.write_text("{{- '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}" + template.read_text())
    return dst
