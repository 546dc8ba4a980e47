"""Multi-exit encoders: an off-ramp after every layer, and batched early exit at inference (DESIGN.md, "Early exit")."""

import torch
from torch import nn

from ..ops import early_exit as ops
from ..ops.checks import as_bool_attention_mask, check_tensor
from .linear import Linear

__all__ = [
    "MultiExitEncoder",
    "ExitHead",
    "BertLayerAdapter",
    "TorchLayerAdapter",
    "check_attention_mask",
]


class ExitHead(nn.Module):
    """An off-ramp: BERT's pooler (first token, dense, tanh) and a linear classifier, ``[B, N, Dm] -> [B, C]``."""

    def __init__(self, hidden_size, num_classes, dropout=0.0):
        super().__init__()
        self.pooler = Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden):
        return self.classifier(self.dropout(torch.tanh(self.pooler(hidden[:, 0]))))


class TorchLayerAdapter(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (batch_first) with the ``(hidden, attention_mask)`` call shape:
    ``attention_mask`` (True = real token) becomes torch's ``src_key_padding_mask`` (True = ignore)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, attention_mask=None):
        return self.layer(
            hidden, src_key_padding_mask=None if attention_mask is None else ~attention_mask
        )


class BertLayerAdapter(nn.Module):
    """A Hugging Face ``BertLayer`` with the ``(hidden, attention_mask)`` call shape: ``attention_mask [B, N]`` (True =
    real token) becomes BERT's additive attention mask ``[B, 1, 1, N]``, and the layer's first output is returned."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden, attention_mask=None):
        mask = None
        if attention_mask is not None:
            mask = (~attention_mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(
                hidden.dtype
            ).min
        out = self.layer(hidden, attention_mask=mask)
        return out[0] if isinstance(out, (tuple, list)) else out


def check_attention_mask(attention_mask, shape, device):
    """``attention_mask [B, N]`` (bool, or 0/1 integers; True/1 = real token, as transformers) as a bool tensor.

    A float mask (an additive bias, or probabilities) is refused rather than guessed at. A row whose first token is
    not real is refused: the off-ramps read the first token ([CLS]), and a padding mask (True = padding) passed by
    mistake looks exactly like that. Raises ``TypeError``/``ValueError`` naming ``attention_mask``.
    """
    attention_mask = as_bool_attention_mask(attention_mask, shape, device)
    if attention_mask is None:
        return None
    if (
        not torch.compiler.is_compiling()
        and attention_mask.numel()
        and not bool(attention_mask[:, 0].all())
    ):
        bad = int(torch.nonzero(~attention_mask[:, 0])[0, 0])
        raise ValueError(
            f"attention_mask[{bad}, 0] is False: True/1 marks real tokens and the first token ([CLS]) of "
            "every row must be real (a padding mask with True = padding is the inverse)"
        )
    return attention_mask


class MultiExitEncoder(nn.Module):
    """A layer stack with an off-ramp after every layer.

    ``layers[i](hidden [B, N, Dm], attention_mask [B, N] or None) -> hidden`` and ``heads[i](hidden) -> [B, C]``;
    ``attention_mask`` is True (or 1) at real tokens, as in transformers and every other effbert API (see
    ``check_attention_mask`` for what is refused). ``forward`` returns every exit's logits ``[L, B, C]``
    (training); ``early_exit`` runs inference where each sample stops at its first confident off-ramp.
    """

    def __init__(self, layers, heads):
        super().__init__()
        layers, heads = list(layers), list(heads)
        if len(layers) != len(heads):
            raise ValueError(
                f"layers and heads must have equal length (an off-ramp per layer), got {len(layers)} "
                f"layers and {len(heads)} heads"
            )
        if not layers:
            raise ValueError("layers must hold at least one layer")
        for name, mods in (("layers", layers), ("heads", heads)):
            for i, m in enumerate(mods):
                if not isinstance(m, nn.Module):
                    raise TypeError(
                        f"{name}[{i}] must be a torch.nn.Module, got {type(m).__name__}"
                    )
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleList(heads)

    @property
    def depth(self):
        return len(self.layers)

    def _check(self, hidden, attention_mask):
        check_tensor("hidden", hidden, ndim=3, shape_hint="[B, N, Dm]")
        return check_attention_mask(attention_mask, hidden.shape[:2], hidden.device)

    def forward(self, hidden, attention_mask=None):
        """Every exit's logits, ``[L, B, C]``."""
        mask = self._check(hidden, attention_mask)
        out = []
        for layer, head in zip(self.layers, self.heads):
            hidden = layer(hidden, mask)
            out.append(head(hidden))
        return torch.stack(out)

    @torch.no_grad()
    def early_exit(
        self,
        hidden,
        attention_mask=None,
        *,
        criterion,
        threshold=None,
        patience=None,
        backend="auto",
    ):
        """Batched early exit: ``(logits [B, C], exit_layer [B] int64, 1-based)``.

        Each sample gets exactly what it gets alone through the per-sample loop (``reference.early_exit_loop``).
        After every layer one fused decision launch writes the exiting samples' results at their batch positions
        and lists the samples that go on; hidden states and attention mask are then compacted to those, so later
        layers run on fewer rows. Criteria: ``"entropy"`` (threshold >= 0), ``"max_prob"`` (threshold in (0, 1]),
        ``"patience"`` (PABEE; ``patience >= 0``, and a ``threshold`` for a one-column regression head).
        Threshold 0 (entropy) and patience 0 mean full depth: every sample exits at the last layer.
        """
        mask = self._check(hidden, attention_mask)
        ops.check_criterion(criterion, threshold, patience)
        state = ops.BatchedExit(
            hidden.shape[0],
            depth=self.depth,
            criterion=criterion,
            threshold=threshold,
            patience=patience,
            device=hidden.device,
            backend=backend,
        )
        if hidden.shape[0] == 0:
            return hidden.new_empty((0, 0)), torch.zeros(0, dtype=torch.int64, device=hidden.device)
        for i, (layer, head) in enumerate(zip(self.layers, self.heads)):
            hidden = layer(hidden, mask)
            logits = head(hidden)
            if logits.dim() != 2 or logits.shape[0] != hidden.shape[0]:
                raise ValueError(
                    f"heads[{i}] must return logits [B, C] = [{hidden.shape[0]}, C], got shape "
                    f"{tuple(logits.shape)}"
                )
            keep = state.step(logits, i + 1)
            if state.active == 0:
                break
            if keep is not None:  # some rows left: run the rest of the stack on those that go on
                hidden = hidden.index_select(0, keep)
                mask = None if mask is None else mask.index_select(0, keep)
        return state.logits, state.exit_layer.long()
