"""EarlyBERT's search phase in a ``transformers`` Trainer run: the early-bird stop (a
``TrainerCallback``) and the step from a finished search to the model to retrain.

The paper (Chen et al., ACL 2021, Section 3) draws a ticket as training goes and stops the search
once successive tickets stop changing; its released code (VITA-Group/EarlyBERT) instead records the
coefficients every step and draws once at a fixed step (``slimming_coef_step``).
``EarlyBirdCallback`` implements the paper's test as You et al. define it ("Drawing Early-Bird
Tickets", ICLR 2020; code RICE-EIC/Early-Bird-Tickets): every ``draw_every`` optimizer steps a
ticket is drawn (``effbert.models.early_bird.draw_ticket``) and its normalised Hamming distance to
the previous one is queued; the search stops when the last ``patience`` distances (default 5, their
queue length) are all below ``threshold`` (default 0.1, their epsilon).
"""

import collections

import torch
from transformers import TrainerCallback

from ..models import early_bird as eb

__all__ = ["EarlyBirdCallback", "ticket_model"]


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class EarlyBirdCallback(TrainerCallback):
    """Stops a search run (a model with ``effbert.models.early_bird.add_coefficients``) once its
    ticket has converged.

    Every ``draw_every`` optimizer steps (``state.global_step``) a ticket is drawn from the
    coefficients with ``draw_ticket(..., **draw_kwargs)`` (ratios and methods; the published
    defaults); ``distances`` records ``(step, distance to the previous ticket)``. When the last
    ``patience`` distances are all ``< threshold`` the callback sets
    ``control.should_training_stop`` (``stop=False`` only records) and keeps the ticket in
    ``ticket`` with its step in ``stopped_at``. A run that ends first leaves the last drawn ticket
    in ``ticket`` (``stopped_at`` None), drawing one at the end if none was.

    ``keep_initial=True`` (default) copies the model's state dict (CPU) at the start of training
    into ``initial_state``: the pre-search weights EarlyBERT retrains from (``ticket_model``).

    Raises ``ValueError`` for a non-positive ``draw_every`` / ``patience`` or a ``threshold``
    outside [0, 1], and at the start of training if the model has no coefficients.
    """

    def __init__(
        self, draw_every=10, threshold=0.1, patience=5, stop=True, keep_initial=True, **draw_kwargs
    ):
        _positive_int("draw_every", draw_every)
        _positive_int("patience", patience)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        unknown = set(draw_kwargs) - {"head_ratio", "head_method", "ffn_ratio", "ffn_method"}
        if unknown:
            raise ValueError(f"unknown draw_ticket arguments: {sorted(unknown)}")
        self.draw_every, self.threshold, self.patience = draw_every, float(threshold), patience
        self.stop, self.keep_initial, self.draw_kwargs = stop, keep_initial, dict(draw_kwargs)
        self.distances, self.ticket, self.stopped_at, self.initial_state = [], None, None, None
        self._last = None
        self._window = collections.deque(maxlen=patience)

    def draw(self, model):
        """The ticket ``(head_keep, ffn_keep)`` the model's coefficients give now."""
        return eb.draw_ticket(*eb.coefficients(_unwrap(model)), **self.draw_kwargs)

    def observe(self, ticket, step):
        """Queue ``ticket`` drawn at ``step``; returns True when the search has converged (the stop
        test)."""
        if self._last is not None:
            d = eb.mask_distance(self._last, ticket)
            self.distances.append((step, d))
            self._window.append(d)
        self._last = ticket
        return len(self._window) == self.patience and max(self._window) < self.threshold

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        eb.coefficients(model)  # raises without coefficients
        if self.keep_initial:
            self.initial_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.draw_every or self.stopped_at is not None:
            return control
        ticket = self.draw(model)
        if self.observe(ticket, state.global_step):
            self.ticket, self.stopped_at = ticket, state.global_step
            if self.stop:
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.ticket is None:
            self.ticket = self._last if self._last is not None else self.draw(model)
        return control


def ticket_model(model, initial_state, ticket):
    """EarlyBERT's retraining start: ``model`` (the search model, coefficients included) with
    ``initial_state`` (its state dict before the search, e.g. ``EarlyBirdCallback.initial_state``)
    loaded, its coefficients removed and pruned to ``ticket = (head_keep, ffn_keep)``, in place.
    Returns ``model``. Raises ``ValueError`` without a ticket or a state, and what
    ``load_state_dict`` / ``prune_model`` raise."""
    if ticket is None or initial_state is None:
        raise ValueError("ticket_model needs the ticket and the pre-search state dict")
    model = _unwrap(model)
    with torch.no_grad():
        model.load_state_dict(initial_state)
    eb.remove_coefficients(model)
    return eb.prune_model(model, *ticket)
