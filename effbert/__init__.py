"""effbert: fused Triton and CUDA C++ kernels for BERT pretraining and inference (TUPE, TNF, early exit)."""

__version__ = "0.1.0"

from .ops import BACKENDS, BackendNotSupportedError, BackendStatus, backends, exit_entropy  # noqa: E402

# TNF note dictionary
from .ops import note_mix, note_update_  # noqa: E402

__all__ = ["BACKENDS", "BackendNotSupportedError", "BackendStatus", "backends", "exit_entropy", "__version__",
           "note_mix", "note_update_"]
