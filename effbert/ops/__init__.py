"""Public functional ops: argument checks, backend dispatch and torch.library registration."""

from ._dispatch import BACKENDS, BackendNotSupportedError, BackendStatus, backends
from .early_exit import exit_entropy

# TNF note dictionary
from .notes import note_fold_, note_mix, note_update_, note_window_means

__all__ = ["BACKENDS", "BackendNotSupportedError", "BackendStatus", "backends", "exit_entropy",
           "note_fold_", "note_mix", "note_update_", "note_window_means"]
