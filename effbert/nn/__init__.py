"""Drop-in modules built on effbert.ops."""

from .early_exit import BertLayerAdapter, ExitHead, MultiExitEncoder, TorchLayerAdapter
from .notes import NoteDictionary
from .tupe_attention import TupePositionBias, TupeSelfAttention

__all__ = [
    "TupePositionBias",
    "TupeSelfAttention",
    "NoteDictionary",
    "MultiExitEncoder",
    "ExitHead",
    "BertLayerAdapter",
    "TorchLayerAdapter",
]
