"""The tiny tokenizer shipped with the package (built by scripts/build_tokenizer.py).

Used by the embedded default run and by tests, so nothing has to be downloaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any


def shipped_tokenizer_path() -> Path:
    """Directory holding the shipped tokenizer (tokenizer.json, tokenizer_config.json, chat template)."""
    try:
        path = Path(str(resources.files("memento_train") / "assets" / "tokenizer"))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - odd import setups
        path = Path(__file__).resolve().parent / "assets" / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"shipped tokenizer not found at {path}; rebuild it with scripts/build_tokenizer.py")
    return path


def load_shipped_tokenizer() -> Any:
    """Load the shipped tokenizer as a transformers fast tokenizer (with ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shipped_tokenizer_path()))
