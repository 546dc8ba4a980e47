"""Drop-in modules built on effbert.ops."""

from .tupe_attention import TupePositionBias, TupeSelfAttention

# TNF note dictionary
from .notes import NoteDictionary

__all__ = ["TupePositionBias", "TupeSelfAttention", "NoteDictionary"]
