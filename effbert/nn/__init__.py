"""Drop-in modules built on effbert.ops."""

from .early_exit import BertLayerAdapter, ExitHead, MultiExitEncoder, TorchLayerAdapter
from .linear import Linear
from .notes import NoteDictionary
from .tupe_attention import TupePositionBias, TupeSelfAttention

__all__ = [
    "Linear",
    "TupePositionBias",
    "TupeSelfAttention",
    "NoteDictionary",
    "MultiExitEncoder",
    "ExitHead",
    "BertLayerAdapter",
    "TorchLayerAdapter",
]
