"""Eager PyTorch references: the ground truth of every test and the ``eager`` backend.

Written for clarity, not speed. They never import kernels.
"""

from .early_exit import exit_entropy

# TNF note dictionary
from .notes import note_fold_, note_mix, note_mix_backward, note_update_, note_window_means

__all__ = ["exit_entropy", "note_fold_", "note_mix", "note_mix_backward", "note_update_", "note_window_means"]
