"""Training losses for multi-exit encoders, as the published methods' code computes them: RomeBERT's
self-distillation loss (fused kernel on CUDA), its gradient equilibrium and gradient regularization (romebert/RomeBERT),
PABEE's layer-weighted loss (JetRunner/PABEE) and DeeBERT's two-stage losses (castorini/DeeBERT)."""

import torch
from torch import nn

from . import reference
from .ops.checks import check_tensor
from .ops.early_exit import check_exit_logits
from .ops.early_exit import multi_exit_distillation_loss as _distillation_op

__all__ = [
    "multi_exit_distillation_loss",
    "pabee_loss",
    "deebert_loss",
    "gradient_equilibrium",
    "gradient_regularized_backward",
    "romebert_projected_parameters",
    "PROJECT_SIDES",
]

PROJECT_SIDES = ("others", "final")


class _GradientRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient of exit i by ``scale[i]`` (RomeBERT's
    ``GradientRescaleFunction``, one launch for every exit)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))), None


def gradient_equilibrium(exit_logits):
    """RomeBERT's gradient equilibrium (``--ge``): returns ``exit_logits [L, ...]`` unchanged in the forward pass,
    while the backward pass scales the gradient reaching exit ``i`` (0-based) by ``1 / (L - i)``: the last exit keeps
    its gradient, the first gets ``1 / L``. RomeBERT applies ``gradient_rescale(highway_logits, 1.0 / (nBlocks - i))``
    to every off-ramp's logits (romebert/RomeBERT, ``transformers/new_modeling_highway_bert.py``).

    Raises ``ValueError`` when ``exit_logits`` is not a float tensor with at least one exit.
    """
    check_tensor("exit_logits", exit_logits)
    if exit_logits.dim() < 1 or exit_logits.shape[0] < 1 or not exit_logits.is_floating_point():
        raise ValueError(
            f"exit_logits must be a float tensor [L, ...] with L >= 1, got {exit_logits.dtype} "
            f"{tuple(exit_logits.shape)}"
        )
    depth = exit_logits.shape[0]
    scale = 1.0 / torch.arange(depth, 0, -1, dtype=torch.float64, device=exit_logits.device)
    return _GradientRescale.apply(exit_logits, scale)


_equilibrium = gradient_equilibrium  # the losses' keyword of the same name shadows it


def multi_exit_distillation_loss(
    exit_logits, labels, gamma=0.9, temperature=3.0, *, gradient_equilibrium=False, backend="auto"
):
    """RomeBERT's joint self-distillation loss (``effbert.ops.early_exit.multi_exit_distillation_loss``: CE of every
    exit, ``gamma T^2 KL`` from the detached last exit with KL averaged over ``B * C`` as RomeBERT's ``KDLoss``),
    with RomeBERT's published defaults gamma 0.9 and T 3. ``gradient_equilibrium=True`` first passes the logits
    through ``gradient_equilibrium`` (RomeBERT's ``--ge``)."""
    if gradient_equilibrium:
        exit_logits = _equilibrium(exit_logits)
    return _distillation_op(exit_logits, labels, gamma, temperature, backend=backend)


def _check_task_labels(exit_logits, labels):
    """Integer class labels in range, or float targets for a one-column regression head; returns the labels to use."""
    regression = exit_logits.shape[-1] == 1 and labels.is_floating_point()
    if regression:
        return labels
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            "labels must be integer class indices (float labels need a one-column regression head), "
            f"got {str(labels.dtype).replace('torch.', '')} with C = {exit_logits.shape[-1]}"
        )
    if labels.device.type == "cpu" and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= exit_logits.shape[-1]:
            raise ValueError(
                f"labels must be class indices in [0, {exit_logits.shape[-1]}), got values in "
                f"[{lo}, {hi}]"
            )
    return labels.long()


def deebert_loss(exit_logits, labels, stage, *, gradient_equilibrium=False):
    """DeeBERT's two-stage training (castorini/DeeBERT, ``modeling_highway_bert.py`` and ``run_highway_glue.py``).

    ``stage=1``: the last exit's loss alone (train the backbone and final classifier). ``stage=2``: the sum of every
    other exit's loss (``sum(highway_losses[:-1])``), with the backbone and final classifier frozen by the caller
    (``requires_grad_(False)``), so only the off-ramps learn. Each loss is cross-entropy for integer ``labels [B]``,
    mean squared error for a one-column regression head with float ``labels``. ``exit_logits [L, B, C]``.
    Raises ``ValueError`` for a stage other than 1 or 2, or for stage 2 with a single exit.
    """
    check_exit_logits(exit_logits, labels)
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"stage must be 1 (backbone) or 2 (off-ramps), got {stage!r}")
    if stage == 2 and exit_logits.shape[0] < 2:
        raise ValueError(
            "stage 2 trains the off-ramps before the last exit: exit_logits needs L >= 2"
        )
    labels = _check_task_labels(exit_logits, labels)
    if gradient_equilibrium:
        exit_logits = _equilibrium(exit_logits)
    return reference.deebert_loss(exit_logits, labels, stage)


def pabee_loss(exit_logits, labels, *, gradient_equilibrium=False):
    """PABEE's layer-weighted loss ``sum_i i * loss_i / sum_i i`` over ``exit_logits [L, B, C]``: cross-entropy for
    integer ``labels [B]``, mean squared error for a one-column regression head with float ``labels``
    (JetRunner/PABEE, ``pabee/modeling_bert.py``). ``gradient_equilibrium=True``: see ``gradient_equilibrium``."""
    check_exit_logits(exit_logits, labels)
    labels = _check_task_labels(exit_logits, labels)
    if gradient_equilibrium:
        exit_logits = _equilibrium(exit_logits)
    return reference.pabee_loss(exit_logits, labels)


def romebert_projected_parameters(encoder):
    """The parameters RomeBERT's gradient regularization projects: every layer's weights except the last layer's,
    without LayerNorm parameters and biases (those, the last layer and the off-ramps take the plain sum)."""
    layers = getattr(encoder, "layers", None)
    if layers is None or len(layers) < 1:
        raise TypeError(
            f"encoder must have a non-empty `layers` sequence (a MultiExitEncoder), got "
            f"{type(encoder).__name__}"
        )
    out = []
    for layer in list(layers)[:-1]:
        for mod in layer.modules():
            if isinstance(mod, nn.LayerNorm):
                continue
            for name, p in mod.named_parameters(recurse=False):
                if p.requires_grad and not name.endswith("bias"):
                    out.append(p)
    return out


def gradient_regularized_backward(
    final_loss, other_loss, parameters, projected, *, project="others"
):
    """RomeBERT's gradient regularization (its ``--gp`` block, romebert/RomeBERT ``examples/new_run_highway_glue.py``).

    Accumulates into ``.grad`` of ``parameters`` the gradient of ``final_loss + other_loss``, except that the
    gradients of the tensors in ``projected`` are first concatenated into one vector per loss (``g_f`` for
    ``final_loss``, ``g_o`` for ``other_loss``) and one side is projected once:

    - ``project="others"``: ``g_o <- g_o - min(<g_o, g_f> / |g_f|^2, 0) g_f`` (the other exits' gradient loses its
      part that conflicts with the last exit's). RomeBERT's setting for MNLI and QQP ("origin").
    - ``project="final"``: ``g_f <- g_f - min(<g_f, g_o> / |g_o|^2, 0) g_o``. RomeBERT's setting for the other GLUE
      tasks ("reverse").

    ``final_loss``: the last exit's loss; ``other_loss``: the other exits' terms (CE and distillation), scalars.
    ``parameters``: every trainable tensor; ``projected``: the subset to regularize
    (``romebert_projected_parameters(encoder)``: every layer but the last, no LayerNorm, no biases).
    The decision stays on the device (no host synchronisation). Returns a 0-dim bool tensor on the parameters'
    device: True when the step projected (the two gradients conflicted).
    Raises ``ValueError`` for a non-scalar loss, an empty ``parameters``, a ``projected`` that is not a subset, or an
    unknown ``project``.
    """
    if project not in PROJECT_SIDES:
        raise ValueError(f"project must be one of {PROJECT_SIDES}, got {project!r}")
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("parameters must hold at least one tensor that requires grad")
    for name, loss in (("final_loss", final_loss), ("other_loss", other_loss)):
        check_tensor(name, loss)
        if loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar loss, got shape {tuple(loss.shape)}")
    projected = list(projected)
    ids = {id(p) for p in params}
    proj_ids = {id(p) for p in projected}
    if not proj_ids <= ids:
        raise ValueError("projected must be a subset of parameters (tensors that require grad)")
    g_final = torch.autograd.grad(final_loss, params, retain_graph=True, allow_unused=True)
    g_other = torch.autograd.grad(other_loss, params, allow_unused=True)
    g_final = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_final)]
    g_other = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_other)]
    sel = [i for i, p in enumerate(params) if id(p) in proj_ids]
    device = params[0].device
    did = torch.zeros((), dtype=torch.bool, device=device)
    if sel:
        moved, ref = (g_other, g_final) if project == "others" else (g_final, g_other)
        # one concatenated vector per side: the sums over tensors are the dot product and norm of the concatenation
        dot = torch.stack([(moved[i].double() * ref[i].double()).sum() for i in sel]).sum()
        norm2 = torch.stack([(ref[i].double() ** 2).sum() for i in sel]).sum()
        coef = torch.where(
            norm2 > 0,
            dot / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)),
            torch.zeros_like(norm2),
        ).clamp(max=0.0)
        did = (coef < 0).to(device)
        for i in sel:
            moved[i] = moved[i] - coef.to(device=moved[i].device, dtype=moved[i].dtype) * ref[i]
    for p, gf, go in zip(params, g_final, g_other):
        g = gf + go
        p.grad = g if p.grad is None else p.grad + g
    return did
