"""Public functional ops: argument checks, backend dispatch and torch.library registration."""

from ._dispatch import BACKENDS, BackendNotSupportedError, BackendStatus, backends
from .early_exit import exit_entropy
from .position_bias import t5_relative_buckets, tupe_position_bias
from .tupe_attention import tupe_attention, tupe_attention_varlen

__all__ = ["BACKENDS", "BackendNotSupportedError", "BackendStatus", "backends", "exit_entropy",
           "t5_relative_buckets", "tupe_position_bias", "tupe_attention", "tupe_attention_varlen"]

# TNF note dictionary
from .notes import note_fold_, note_mix, note_update_, note_window_means  # noqa: E402

__all__ += ["note_fold_", "note_mix", "note_update_", "note_window_means"]
