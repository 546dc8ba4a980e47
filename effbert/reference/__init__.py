"""Eager PyTorch references: the ground truth of every test and the ``eager`` backend.

Written for clarity, not speed. They never import kernels.
"""

from .early_exit import exit_entropy
from .position_bias import t5_relative_buckets, tupe_position_bias
from .tupe_attention import tupe_attention, tupe_attention_varlen

__all__ = ["exit_entropy", "t5_relative_buckets", "tupe_position_bias", "tupe_attention", "tupe_attention_varlen"]

# TNF note dictionary
from .notes import note_fold_, note_mix, note_mix_backward, note_update_, note_window_means  # noqa: E402

__all__ += ["note_fold_", "note_mix", "note_mix_backward", "note_update_", "note_window_means"]
