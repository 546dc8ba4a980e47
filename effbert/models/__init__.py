"""The reference model family."""
