"""Eager PyTorch references: the ground truth of every test and the ``eager`` backend.

Written for clarity, not speed. They never import kernels.
"""

from .early_exit import exit_entropy

__all__ = ["exit_entropy"]
