"""Drop-in modules built on effbert.ops."""

# TNF note dictionary
from .notes import NoteDictionary

__all__ = ["NoteDictionary"]
