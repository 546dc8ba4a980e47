"""Drop-in modules built on effbert.ops."""

from .tupe_attention import TupePositionBias, TupeSelfAttention

__all__ = ["TupePositionBias", "TupeSelfAttention"]

# early exit
from .early_exit import BertLayerAdapter, ExitHead, MultiExitEncoder, TorchLayerAdapter  # noqa: E402

__all__ += ["BertLayerAdapter", "ExitHead", "MultiExitEncoder", "TorchLayerAdapter"]
