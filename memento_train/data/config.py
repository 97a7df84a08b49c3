"""Configuration of the data pipeline: where records come from and how they become token streams.

One :class:`DataConfig` drives loading (:mod:`.records`), rendering (:mod:`.render`), validation
(:mod:`.validate`) and the pre-tokenized Arrow cache (:mod:`.cache`). Its ``block_masking`` field is
the same :class:`~memento_train.masking.BlockMaskingConfig` rollouts, ``memento-eval`` and the serving
engine use, so the kill rows stored in the cache are exactly the ones attention will apply. It is
built like every other config (:func:`memento_train.config.tree.build`) and its errors are
:class:`~memento_train.config.errors.ConfigError`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from memento_train.config.errors import ConfigError
from memento_train.config.tree import build, check_types, renamed_from
from memento_train.masking import BlockMaskingConfig

HfConfig = Literal["default", "full"]
OverlongPolicy = Literal["drop", "truncate"]
HF_CONFIGS = get_args(HfConfig)
OVERLONG_POLICIES = get_args(OverlongPolicy)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SAMPLE_TRACES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "sample_traces.jsonl")
# The file `memento-data prepare` writes beside the tokenized examples (read by data.prepared).
PREPARED_MANIFEST = "memento_prepare.json"


def __getattr__(name: str) -> Any:
    if name == "DataConfigError":  # data config errors are ConfigErrors, like every other option's
        warnings.warn(
            "DataConfigError is deprecated; catch memento_train.config.errors.ConfigError",
            DeprecationWarning,
            stacklevel=2,
        )
        return ConfigError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class DataConfig:
    """Options of the data pipeline.

    Attributes:
        path: a local ``.jsonl``/``.json``/``.parquet`` file, a directory of such files, or a
            Hugging Face hub dataset name (e.g. ``"microsoft/OpenMementos"``). Defaults to the
            shipped sample traces.
        hf_config: ``"default"`` (records carry ``response`` with the special tokens written out) or
            ``"full"`` (records carry ``sentences``/``blocks``/``block_summaries``; see
            :mod:`.records` for how the response is assembled). Also the hub config name.
        split: dataset split to read (local files are exposed under this split name too).
        system_prompt: optional system message rendered before the user turn.
        max_seq_len: longest token stream (prompt + response) a record may have.
        overlong: ``"drop"`` skips records longer than ``max_seq_len``; ``"truncate"`` keeps their
            first ``max_seq_len`` tokens (safe: a block whose summary never ends is never evicted).
        strict: raise :class:`~.validate.InvalidRecordError` on the first bad record instead of
            skipping and counting it.
        num_proc: worker processes for ``datasets.map`` (1 = in-process).
        cache_dir: directory for the pre-tokenized Arrow cache (and the ``datasets`` download cache);
            ``None`` uses the ``datasets`` default cache.
        block_masking: eviction options (``keep_last_n_blocks`` etc.) used to compute kill rows
            (``mask`` is its deprecated old name).
        tokenizer: a tokenizer directory or hub name for ``AutoTokenizer``; ``None`` = the tiny
            tokenizer shipped with the package. The memento tokens are added when it lacks them, as
            training adds them. In a training run the data is tokenized with the *model's* tokenizer
            (``model.tokenizer`` / ``model.path``): setting this there only asserts that it is the same
            tokenizer, and a different one is refused naming both.
        prepared: a directory written by ``memento-data prepare``: training reads its tokenized
            examples instead of rendering ``path`` (no tokenization on the cluster). Its rendering
            options (tokenizer, ``mask``, ``max_seq_len``, ``overlong``, ``system_prompt``) must equal
            this run's or the run is refused naming the difference; ``path``, ``hf_config``,
            ``split``, ``strict``, ``num_proc`` and ``cache_dir`` are then not used.
    """

    path: str = SAMPLE_TRACES
    hf_config: HfConfig = "default"
    split: str = "train"
    system_prompt: str | None = None
    max_seq_len: int = 32768
    overlong: OverlongPolicy = "drop"
    strict: bool = False
    num_proc: int = 1
    cache_dir: str | None = None
    block_masking: BlockMaskingConfig = field(default_factory=BlockMaskingConfig, metadata=renamed_from("mask"))
    tokenizer: str | None = None
    prepared: str | None = None

    def validate(self, prefix: str = "data") -> DataConfig:
        """Check every option; raise :class:`ConfigError` naming the first bad one. Returns self."""
        check_types(self, prefix)
        if not str(self.path).strip():
            raise ConfigError(f"{prefix}.path must be a file, a directory or a hub dataset name, got {self.path!r}")
        if not self.split:
            raise ConfigError(f"{prefix}.split must be a non-empty string such as 'train', got {self.split!r}")
        if self.max_seq_len < 2:
            raise ConfigError(f"{prefix}.max_seq_len must be an int >= 2, got {self.max_seq_len!r}")
        if self.num_proc < 1:
            raise ConfigError(f"{prefix}.num_proc must be an int >= 1, got {self.num_proc!r}")
        if self.tokenizer is not None and not str(self.tokenizer):
            raise ConfigError(
                f"{prefix}.tokenizer must be a tokenizer directory / hub name, or null for the "
                f"shipped one, got {self.tokenizer!r}"
            )
        if self.prepared is not None:
            if not os.path.isfile(os.path.join(os.path.expanduser(str(self.prepared)), PREPARED_MANIFEST)):
                raise ConfigError(
                    f"{prefix}.prepared={self.prepared!r} is not a directory written by `memento-data prepare` "
                    f"(no {PREPARED_MANIFEST} in it); run `memento-data prepare DATA --output DIR` first, or drop "
                    f"{prefix}.prepared to tokenize {prefix}.path in the run"
                )
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build and validate from a plain mapping (e.g. a YAML recipe's ``data:`` section), with the
        rules of every config (:func:`memento_train.config.tree.build`)."""
        return build(cls, values, "data").validate()
