"""Data pipeline: records → rendered token streams (kinds, kill rows, labels) → validated → packed.

Modules, one idea each:

- :mod:`.config` — :class:`DataConfig`;
- :mod:`.records` — load local files / hub datasets and normalise to one schema (``full`` assembly);
- :mod:`.render` — ChatML rendering, tokenization, parse → :class:`RenderedExample`;
- :mod:`.validate` — rejection reasons, :class:`ValidationReport`, strict mode;
- :mod:`.pack` — best-fit-decreasing packing into :class:`PackedBatch`;
- :mod:`.cache` — :func:`prepare_dataset`, the fingerprinted Arrow cache;
- :mod:`.prepared` — :func:`load_examples`: a run's examples, from ``memento-data prepare``'s directory
  (``data.prepared``) or rendered in the run, checked against the model's tokenizer;
- :mod:`.synthetic` — the deterministic running-total Memento task (blocks need their summaries);
- :mod:`.stats` / :mod:`.cli` — ``memento-data stats``, ``prepare`` and ``synth``.
"""

from memento_train.data.cache import prepare_dataset
from memento_train.data.config import DataConfig
from memento_train.data.pack import (
    PackedBatch,
    PackingStats,
    collate,
    pack_examples,
    plan_bins,
)
from memento_train.data.prepared import load_examples
from memento_train.data.records import RecordFieldError, assemble_full_response, load_records
from memento_train.data.render import IGNORE_INDEX, RenderedExample, Renderer, render_record
from memento_train.data.synthetic import SyntheticTaskConfig, synthetic_record, synthetic_records
from memento_train.data.validate import (
    REASONS,
    InvalidRecordError,
    ValidationReport,
    check_record,
    validate_records,
)

__all__ = [
    "DataConfig",
    "IGNORE_INDEX",
    "InvalidRecordError",
    "PackedBatch",
    "PackingStats",
    "REASONS",
    "RecordFieldError",
    "RenderedExample",
    "Renderer",
    "SyntheticTaskConfig",
    "ValidationReport",
    "assemble_full_response",
    "check_record",
    "collate",
    "load_examples",
    "load_records",
    "pack_examples",
    "plan_bins",
    "prepare_dataset",
    "render_record",
    "synthetic_record",
    "synthetic_records",
    "validate_records",
]


def __getattr__(name: str):
    if name == "DataConfigError":  # deprecated alias of ConfigError (see memento_train.data.config)
        from memento_train.data import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
