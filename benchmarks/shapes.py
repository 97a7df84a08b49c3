"""The benchmarks' OpenMementos-shaped batches; they live in :mod:`memento_train.trace_shapes`."""

from memento_train.trace_shapes import PLAIN, SPECIAL, memento_batch, memento_document  # noqa: F401
