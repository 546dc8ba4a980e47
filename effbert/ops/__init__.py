"""Public functional ops: argument checks, backend dispatch and torch.library registration."""

from ._dispatch import BACKENDS, BackendNotSupportedError, BackendStatus, backends
from .early_exit import exit_entropy

__all__ = ["BACKENDS", "BackendNotSupportedError", "BackendStatus", "backends", "exit_entropy"]

# batched early exit: the fused per-layer decision and RomeBERT's loss
from .early_exit import exit_decision, multi_exit_distillation_loss  # noqa: E402

__all__ += ["exit_decision", "multi_exit_distillation_loss"]
