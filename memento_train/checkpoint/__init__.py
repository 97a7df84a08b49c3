"""Resumable checkpoints: directories with manifests, and one rank's share of them."""
