"""Drop-in modules built on effbert.ops."""

# early exit
from .early_exit import BertLayerAdapter, ExitHead, MultiExitEncoder, TorchLayerAdapter  # noqa: E402

__all__ = ["BertLayerAdapter", "ExitHead", "MultiExitEncoder", "TorchLayerAdapter"]
