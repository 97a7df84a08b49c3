"""Hugging Face exports: the writer, and compatibility with transformers 4.x readers."""
