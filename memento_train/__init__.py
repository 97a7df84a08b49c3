"""memento-train: distributed SFT and RL for Memento reasoning models."""

__version__ = "0.1.0"
