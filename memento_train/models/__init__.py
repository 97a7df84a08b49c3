"""Model construction helpers (no model code: stock HF classes are used unchanged)."""

from memento_train.models.tiny import build_tiny_model, tiny_model_config

__all__ = ["build_tiny_model", "tiny_model_config"]
