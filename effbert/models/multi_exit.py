"""Multi-exit training in one place: the loss names, the loss of a model's exits (``exit_loss``) and
DeeBERT's two training stages (``MultiExitMixin.set_deebert_stage``), shared by
``TupeBertForSequenceClassification``, ``TupeBertForTokenClassification`` and
``effbert.integrations.hf.MultiExitBert``.

As transformers models own their loss, the model decides it: its config names the loss and its
settings (``TupeBertConfig.exit_loss``, ``exit_loss_gamma``, ``exit_loss_temperature``,
``exit_gradient_equilibrium``; ``MultiExitBert`` takes them as arguments), and
``model(..., labels=...)`` returns it. A ``Trainer`` then needs no loss of its own;
``effbert.training.MultiExitTrainer`` adds only RomeBERT's gradient regularization.

Sources: RomeBERT (romebert/RomeBERT, ``new_modeling_highway_bert.py``: self-distillation,
``--ge``), PABEE (JetRunner/PABEE, ``pabee/modeling_bert.py``: the layer-weighted loss), DeeBERT
(castorini/DeeBERT, ``modeling_highway_bert.py`` and ``run_highway_glue.py``: two stages, the second
with the backbone and the final classifier frozen).
"""

import math

import torch

from .. import losses as _losses

__all__ = [
    "EXIT_LOSSES",
    "DEEBERT_STAGES",
    "check_exit_loss_settings",
    "check_deebert_stage",
    "exit_loss",
    "MultiExitMixin",
]

EXIT_LOSSES = ("romebert", "pabee", "deebert")
DEEBERT_STAGES = (1, 2)


def check_exit_loss_settings(loss, gamma, temperature, gradient_equilibrium=False):
    """Raises ``ValueError`` naming the argument for a ``loss`` outside ``EXIT_LOSSES``, a ``gamma``
    outside [0, 1] or a ``temperature`` that is not a finite number > 0; ``TypeError`` for a
    non-bool ``gradient_equilibrium``."""
    if loss not in EXIT_LOSSES:
        raise ValueError(f"loss must be one of {EXIT_LOSSES}, got {loss!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")
    if not isinstance(gradient_equilibrium, bool):
        raise TypeError(
            f"gradient_equilibrium must be a bool, got {type(gradient_equilibrium).__name__}"
        )


def check_deebert_stage(stage):
    """Raises ``ValueError`` for a stage other than 1 or 2 (a bool is no stage)."""
    if isinstance(stage, bool) or stage not in DEEBERT_STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")


def exit_loss(
    exit_logits,
    labels,
    *,
    loss="romebert",
    gamma=0.9,
    temperature=3.0,
    gradient_equilibrium=False,
    stage=1,
    backend="auto",
):
    """The training loss of a multi-exit model given every exit's logits.

    ``exit_logits [L, B, C]`` float (first exit first; computed in float32, or float64 for float64
    logits); ``labels [B]`` integer classes in ``[0, C)``, or float targets for a one-output
    (regression) head, ``C == 1``. ``loss``: ``"romebert"``
    (``effbert.losses.multi_exit_distillation_loss``: every exit's cross-entropy plus
    ``gamma T^2 KL`` from the detached last exit, RomeBERT's published gamma 0.9 and ``temperature``
    3), ``"pabee"`` (``pabee_loss``: ``sum_i i * loss_i / sum_i i``) or ``"deebert"``
    (``deebert_loss`` of ``stage``: 1 the last exit's loss, 2 the sum of the others'). A regression
    head trains on PABEE's layer-weighted mean squared error under ``"romebert"`` and ``"pabee"``
    (RomeBERT has no regression loss of its own), on DeeBERT's per-stage MSE under ``"deebert"``.
    ``gradient_equilibrium``: RomeBERT's ``--ge`` (exit i's gradient scaled by ``1 / (L - i)``).
    ``backend``: the distillation loss's (``"eager"`` and ``"triton"`` as given; the attention
    backends without a loss kernel, ``"cpu"`` and ``"cuda"``, leave it to ``"auto"``). Returns a
    0-dim tensor. Raises ``ValueError`` / ``TypeError`` naming the argument (the settings as
    ``check_exit_loss_settings``; the logits and labels as the losses check them).
    """
    check_exit_loss_settings(loss, gamma, temperature, gradient_equilibrium)
    check_deebert_stage(stage)
    x = exit_logits if exit_logits.dtype == torch.float64 else exit_logits.float()
    regression = x.shape[-1] == 1
    y = labels.to(x.dtype) if regression and labels.is_floating_point() else labels
    if loss == "deebert":
        return _losses.deebert_loss(x, y, stage, gradient_equilibrium=gradient_equilibrium)
    if loss == "pabee" or regression:
        return _losses.pabee_loss(x, y, gradient_equilibrium=gradient_equilibrium)
    # the fused loss has a Triton kernel and the eager path: the attention backends without a loss
    # kernel (cpu, cuda) leave it to the dispatcher
    backend = backend if backend in ("eager", "triton") else "auto"
    return _losses.multi_exit_distillation_loss(
        x,
        y.long(),
        gamma=gamma,
        temperature=temperature,
        gradient_equilibrium=gradient_equilibrium,
        backend=backend,
    )


class MultiExitMixin:
    """What every multi-exit model shares: its loss (``exit_loss_settings`` names it,
    ``compute_exit_loss`` computes it) and DeeBERT's stage (``set_deebert_stage``). A model supplies
    ``exit_loss_settings()`` (a dict of ``exit_loss``'s keywords but ``stage``) and
    ``deebert_parts()`` (``(backbone modules, off-ramps first to last)``)."""

    # DeeBERT's training stage: model state, not config (a run saves its model in stage 1)
    deebert_stage = 1

    def exit_loss_settings(self):
        raise NotImplementedError

    def deebert_parts(self):
        raise NotImplementedError

    def compute_exit_loss(self, exit_logits, labels):
        """``exit_loss`` of ``exit_logits [L, B, C]`` and ``labels [B]`` with this model's settings
        and stage."""
        return exit_loss(exit_logits, labels, stage=self.deebert_stage, **self.exit_loss_settings())

    def set_deebert_stage(self, stage):
        """DeeBERT's training stage (castorini/DeeBERT): 1 trains everything (on the last exit's
        loss with ``exit_loss="deebert"``); 2 freezes the backbone (embeddings and layers) and the
        last off-ramp with ``requires_grad_(False)``, so a ``Trainer`` built afterwards optimizes
        the other off-ramps only (on the sum of their losses); a parameter an off-ramp shares with
        the last one (PABEE's shared pooler) stays frozen. Returns the model. Raises ``ValueError``
        for a stage other than 1 or 2, before changing anything."""
        check_deebert_stage(stage)
        frozen = stage == 2
        backbone, exits = self.deebert_parts()
        exits = list(exits)
        last = exits[-1]
        for module in list(backbone) + [last]:
            module.requires_grad_(not frozen)
        shared = {id(p) for p in last.parameters()}
        for head in exits[:-1]:
            for p in head.parameters():
                p.requires_grad_(not (frozen and id(p) in shared))
        self.deebert_stage = stage
        return self
