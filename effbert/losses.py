"""Training losses for multi-exit encoders: RomeBERT's self-distillation loss (fused kernel on CUDA), PABEE's
layer-weighted loss, and RomeBERT's gradient regularization as a backward step."""

import torch
from torch import nn

from . import reference
from .ops._checks import check_tensor
from .ops.early_exit import check_exit_logits, multi_exit_distillation_loss

__all__ = ["multi_exit_distillation_loss", "pabee_loss", "gradient_regularized_backward",
           "romebert_projected_parameters"]


def pabee_loss(exit_logits, labels):
    """PABEE's layer-weighted loss ``sum_i i * loss_i / sum_i i`` over ``exit_logits [L, B, C]``: cross-entropy for
    integer ``labels [B]``, mean squared error for a one-column regression head with float ``labels``."""
    check_exit_logits(exit_logits, labels)
    regression = exit_logits.shape[-1] == 1 and labels.is_floating_point()
    if not regression:
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError("labels must be integer class indices (float labels need a one-column regression head), "
                            f"got {str(labels.dtype).replace('torch.', '')} with C = {exit_logits.shape[-1]}")
        if labels.device.type == "cpu" and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= exit_logits.shape[-1]:
                raise ValueError(f"labels must be class indices in [0, {exit_logits.shape[-1]}), got values in "
                                 f"[{lo}, {hi}]")
        labels = labels.long()
    return reference.pabee_loss(exit_logits, labels)


def romebert_projected_parameters(encoder):
    """The parameters RomeBERT's gradient regularization projects: every layer's weights except the last layer's,
    without LayerNorm parameters and biases (those, the last layer and the off-ramps take the plain sum)."""
    layers = getattr(encoder, "layers", None)
    if layers is None or len(layers) < 1:
        raise TypeError(f"encoder must have a non-empty `layers` sequence (a MultiExitEncoder), got "
                        f"{type(encoder).__name__}")
    out = []
    for layer in list(layers)[:-1]:
        for mod in layer.modules():
            if isinstance(mod, nn.LayerNorm):
                continue
            for name, p in mod.named_parameters(recurse=False):
                if p.requires_grad and not name.endswith("bias"):
                    out.append(p)
    return out


def gradient_regularized_backward(final_loss, other_loss, parameters, projected):
    """RomeBERT's gradient regularization: accumulate into ``.grad`` of ``parameters`` the gradient of
    ``final_loss + other_loss``, except that on each tensor of ``projected`` the gradient of ``other_loss`` (the
    non-final exits' terms) is first projected off the gradient of ``final_loss`` when the two conflict
    (negative dot product): ``g_o <- g_o - (g_o . g_f / |g_f|^2) g_f``.

    ``final_loss``: the last exit's loss; ``other_loss``: the other exits' (e.g. the distillation terms).
    ``parameters``: every trainable tensor; ``projected``: the subset to regularize
    (``romebert_projected_parameters(encoder)``). Returns the number of tensors whose gradient was projected.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("parameters must hold at least one tensor that requires grad")
    for name, loss in (("final_loss", final_loss), ("other_loss", other_loss)):
        check_tensor(name, loss)
        if loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar loss, got shape {tuple(loss.shape)}")
    ids = {id(p) for p in params}
    proj_ids = {id(p) for p in projected}
    if not proj_ids <= ids:
        raise ValueError("projected must be a subset of parameters")
    g_final = torch.autograd.grad(final_loss, params, retain_graph=True, allow_unused=True)
    g_other = torch.autograd.grad(other_loss, params, allow_unused=True)
    n_projected = 0
    for p, gf, go in zip(params, g_final, g_other):
        gf = torch.zeros_like(p) if gf is None else gf
        go = torch.zeros_like(p) if go is None else go
        if id(p) in proj_ids:
            dot = (go.double() * gf.double()).sum()
            norm2 = (gf.double() ** 2).sum()
            if dot < 0 and norm2 > 0:
                go = go - (dot / norm2).to(go.dtype) * gf
                n_projected += 1
        g = gf + go
        p.grad = g if p.grad is None else p.grad + g
    return n_projected
