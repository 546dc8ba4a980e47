"""Public functional ops: argument checks, backend dispatch and torch.library registration."""

from ._dispatch import BACKENDS, BackendNotSupportedError, BackendStatus, backends
from .early_exit import exit_entropy
from .position_bias import t5_relative_buckets, tupe_position_bias
from .tupe_attention import tupe_attention, tupe_attention_varlen

__all__ = ["BACKENDS", "BackendNotSupportedError", "BackendStatus", "backends", "exit_entropy",
           "t5_relative_buckets", "tupe_position_bias", "tupe_attention", "tupe_attention_varlen"]

# batched early exit: the fused per-layer decision and RomeBERT's loss
from .early_exit import exit_decision, multi_exit_distillation_loss  # noqa: E402

__all__ += ["exit_decision", "multi_exit_distillation_loss"]
