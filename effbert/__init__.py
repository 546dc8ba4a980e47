"""effbert: fused Triton and CUDA C++ kernels for BERT pretraining and inference (TUPE, TNF, MC-BERT, early exit)."""

__version__ = "0.1.0"

from .ops import (  # noqa: E402
    BACKENDS,
    BackendNotSupportedError,
    BackendStatus,
    backends,
    exit_entropy,
    mc_candidate_loss,
    mc_sample,
    mc_sample_fused,
    note_mix,
    note_update_,
    t5_relative_buckets,
    token_exit_decision,
    tupe_attention,
    tupe_attention_varlen,
    tupe_attention_varlen_subset,
    tupe_position_bias,
)
from . import calibration, losses, nn  # noqa: E402

__all__ = [
    "BACKENDS",
    "BackendNotSupportedError",
    "BackendStatus",
    "backends",
    "exit_entropy",
    "token_exit_decision",
    "t5_relative_buckets",
    "tupe_position_bias",
    "tupe_attention",
    "tupe_attention_varlen",
    "tupe_attention_varlen_subset",
    "mc_sample",
    "mc_sample_fused",
    "mc_candidate_loss",
    "note_mix",
    "note_update_",
    "calibration",
    "losses",
    "nn",
    "quantize_for_cpu",
    "__version__",
]


def __getattr__(name):
    """``effbert.quantize_for_cpu`` lives with the models (``effbert.models.quantization``), which need transformers:
    imported when first asked for, so ``import effbert`` stays kernels-only without it."""
    if name == "quantize_for_cpu":
        from .models.quantization import quantize_for_cpu

        return quantize_for_cpu
    raise AttributeError(f"module 'effbert' has no attribute {name!r}")


def _register_auto_classes():
    """Makes ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification``
    know model type ``"tupe-bert"``. A kernels-only install (no transformers) skips it."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from .models import register_auto_classes

    register_auto_classes()


_register_auto_classes()
