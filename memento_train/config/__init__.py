"""Configuration: the typed-tree builder every CLI uses and its one error type."""
