"""Drop-in modules built on effbert.ops."""

from .tupe_attention import TupePositionBias, TupeSelfAttention

__all__ = ["TupePositionBias", "TupeSelfAttention"]
