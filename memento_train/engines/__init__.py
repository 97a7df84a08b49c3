"""Training engines behind one interface: :class:`TrainEngine`, built by :func:`build_engine`."""

from memento_train.engines.base import LossFn, MicroBatch, TrainEngine, build_engine, register_engine
from memento_train.engines.config import ENGINE_KINDS, EngineConfig

__all__ = ["ENGINE_KINDS", "EngineConfig", "LossFn", "MicroBatch", "TrainEngine", "build_engine", "register_engine"]
