"""effbert: fused Triton and CUDA C++ kernels for BERT pretraining and inference (TUPE, TNF, early exit)."""

__version__ = "0.1.0"

from .ops import (  # noqa: E402
    BACKENDS,
    BackendNotSupportedError,
    BackendStatus,
    backends,
    exit_entropy,
    t5_relative_buckets,
    tupe_attention,
    tupe_attention_varlen,
    tupe_position_bias,
)

__all__ = ["BACKENDS", "BackendNotSupportedError", "BackendStatus", "backends", "exit_entropy",
           "t5_relative_buckets", "tupe_position_bias", "tupe_attention", "tupe_attention_varlen", "__version__"]

# early exit: multi-exit encoder, losses and calibration
from . import calibration, losses, nn  # noqa: E402

__all__ += ["calibration", "losses", "nn"]
