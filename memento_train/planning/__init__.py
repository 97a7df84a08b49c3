"""Memory planning before launch: per-GPU and host memory of a recipe (``memento-train plan``)."""
