"""Eager PyTorch references: the ground truth of every test and the ``eager`` backend.

Written for clarity, not speed. They never import kernels.
"""

from .early_exit import exit_entropy
from .position_bias import t5_relative_buckets, tupe_position_bias
from .tupe_attention import tupe_attention, tupe_attention_varlen

__all__ = ["exit_entropy", "t5_relative_buckets", "tupe_position_bias", "tupe_attention", "tupe_attention_varlen"]

# batched early exit: criteria, one layer's decision, the per-sample loop
from .early_exit import CRITERIA, early_exit_loop, exit_decision, exit_max_prob  # noqa: E402

from .early_exit import multi_exit_distillation_loss, pabee_loss  # noqa: E402

__all__ += ["CRITERIA", "early_exit_loop", "exit_decision", "exit_max_prob", "multi_exit_distillation_loss",
            "pabee_loss"]
