"""Configuration of the data pipeline: where records come from and how they become token streams.

One :class:`DataConfig` drives loading (:mod:`.records`), rendering (:mod:`.render`), validation
(:mod:`.validate`) and the pre-tokenized Arrow cache (:mod:`.cache`). Its ``mask`` field is the same
:class:`~memento_train.masking.MaskConfig` the trainer and the serving engine use, so the kill rows
stored in the cache are exactly the ones attention will apply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from memento_train.masking import MaskConfig

HF_CONFIGS = ("default", "full")
OVERLONG_POLICIES = ("drop", "truncate")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SAMPLE_TRACES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "sample_traces.jsonl")


class DataConfigError(ValueError):
    """A :class:`DataConfig` option has a value the pipeline cannot use; the message names it."""


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
        mask: eviction options (``keep_last_n_blocks`` etc.) used to compute kill rows.
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
    hf_config: str = "default"
    split: str = "train"
    system_prompt: str | None = None
    max_seq_len: int = 32768
    overlong: str = "drop"
    strict: bool = False
    num_proc: int = 1
    cache_dir: str | None = None
    mask: MaskConfig = field(default_factory=MaskConfig)
    tokenizer: str | None = None
    prepared: str | None = None

    def validate(self) -> DataConfig:
        """Check every option; raise :class:`DataConfigError` naming the first bad one. Returns self."""
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            raise DataConfigError(
                f"data.path must be a file, a directory or a hub dataset name, got {self.path!r}"
            )
        if self.hf_config not in HF_CONFIGS:
            raise DataConfigError(f"data.hf_config must be one of {HF_CONFIGS}, got {self.hf_config!r}")
        if not isinstance(self.split, str) or not self.split:
            raise DataConfigError(f"data.split must be a non-empty string such as 'train', got {self.split!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise DataConfigError(
                f"data.system_prompt must be a string or None, got {type(self.system_prompt).__name__}"
            )
        if isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            raise DataConfigError(f"data.max_seq_len must be an int >= 2, got {self.max_seq_len!r}")
        if self.overlong not in OVERLONG_POLICIES:
            raise DataConfigError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if not isinstance(self.strict, bool):
            raise DataConfigError(f"data.strict must be true or false, got {self.strict!r}")
        if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise DataConfigError(f"data.num_proc must be an int >= 1, got {self.num_proc!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise DataConfigError(f"data.cache_dir must be a directory path or None, got {self.cache_dir!r}")
        if not isinstance(self.mask, MaskConfig):
            raise DataConfigError(
                "data.mask must be a memento_train.masking.MaskConfig "
                f"(use DataConfig.from_dict for plain dicts), got {type(self.mask).__name__}"
            )
        tok = self.tokenizer
        if tok is not None and (not isinstance(tok, (str, os.PathLike)) or not str(tok)):
            raise DataConfigError(
                f"data.tokenizer must be a tokenizer directory / hub name, or None for the shipped one, "
                f"got {self.tokenizer!r}"
            )
        if self.prepared is not None:
            from memento_train.data.prepared import MANIFEST

            if not isinstance(self.prepared, (str, os.PathLike)) or not os.path.isfile(
                    os.path.join(os.path.expanduser(str(self.prepared)), MANIFEST)):
                raise DataConfigError(
                    f"data.prepared={self.prepared!r} is not a directory written by `memento-data prepare` "
                    f"(no {MANIFEST} in it); run `memento-data prepare DATA --output DIR` first, or drop "
                    "data.prepared to tokenize data.path in the run"
                )
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a plain mapping (e.g. a YAML recipe's ``data:`` section); ``mask`` may be a dict.

        Unknown keys raise :class:`DataConfigError` listing the accepted ones.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataConfigError(f"unknown data option(s) {unknown}; accepted: {sorted(known)}")
        values = dict(values)
        mask = values.get("mask")
        if isinstance(mask, dict):
            mask_known = {f.name for f in fields(MaskConfig)}
            bad = sorted(set(mask) - mask_known)
            if bad:
                raise DataConfigError(f"unknown data.mask option(s) {bad}; accepted: {sorted(mask_known)}")
            try:
                values["mask"] = MaskConfig(**mask)
            except ValueError as exc:
                raise DataConfigError(f"data.mask: {exc}") from exc
        return cls(**values).validate()
