"""The benchmarks' OpenMementos-shaped batches; they live in :mod:`memento_train.planning.trace_shapes`."""

from memento_train.planning.trace_shapes import PLAIN, SPECIAL, memento_batch, memento_document  # noqa: F401
