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

__all__ = [
    "EarlyBirdCallback",
    "ticket_model",
    "ticket_masks",
    "prune_like_checkpoint",
    "search",
    "search_line",
    "start_line",
]


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


def ticket_masks(ticket, num_heads, intermediate_size):
    """The bool masks ``(head_keep [L, H], ffn_keep [L, intermediate])`` of a recorded ticket
    (``config.early_bird_ticket``: kept indices per layer) for a model of ``num_heads`` heads and
    ``intermediate_size`` FFN neurons a layer. Raises ``ValueError`` for a malformed ticket."""
    if not isinstance(ticket, dict) or set(ticket) != {"heads", "ffn"}:
        raise ValueError("ticket must be a dict with keys 'heads' and 'ffn'")
    layers = len(ticket["heads"])
    if len(ticket["ffn"]) != layers:
        raise ValueError("ticket['heads'] and ticket['ffn'] must list the same layers")
    masks = []
    for rows, width in ((ticket["heads"], num_heads), (ticket["ffn"], intermediate_size)):
        mask = torch.zeros(layers, width, dtype=torch.bool)
        for i, row in enumerate(rows):
            if any(not 0 <= int(j) < width for j in row):
                raise ValueError(f"ticket indices must be in [0, {width}), got {list(row)}")
            mask[i, [int(j) for j in row]] = True
        masks.append(mask)
    return tuple(masks)


def prune_like_checkpoint(model, checkpoint):
    """Prune the freshly built, unpruned ``model`` (in place) to the ticket recorded in the
    ``config.json`` of ``checkpoint`` (a Trainer checkpoint folder), so that the Trainer can load
    the checkpoint's pruned weights into it. Returns the ticket, or None when the checkpoint's model
    is unpruned (``model`` left as it is). Raises ``ValueError`` for an unreadable config or a
    ticket that does not fit ``model``."""
    import json
    import os

    path = os.path.join(os.fspath(checkpoint), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            ticket = json.load(f).get("early_bird_ticket")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot read the config of checkpoint {path!r}: {exc}") from None
    if not ticket:
        return None
    cfg = _unwrap(model).config
    eb.prune_model(model, *ticket_masks(ticket, cfg.num_attention_heads, cfg.intermediate_size))
    return ticket


def search(model, make_trainer, *, head_l1=eb.L1_COEF, ffn_l1=eb.L1_COEF, **callback_kwargs):
    """EarlyBERT's search on ``model``, then the model pruned to its ticket from the pre-search
    weights (in place; the command-line runs' step, ``effbert pretrain|finetune --early-bird``).

    ``make_trainer(callback)`` builds the search's Trainer (the run's Trainer class, its own
    arguments: no checkpoints, the search's steps) with ``callback`` (an ``EarlyBirdCallback`` made
    from ``callback_kwargs``) among its callbacks; the coefficients are added
    (``add_coefficients(model, head_l1=..., ffn_l1=...)``) before it is built. Returns a dict:
    ``stopped_at`` (the early-bird step, None when the search ran to its end), ``search_steps``,
    ``heads_kept`` / ``heads_total``, ``ffn_kept`` / ``ffn_total``, ``params_before`` /
    ``params_after``, ``ticket`` (kept indices per layer) and ``distances`` (``[step, distance]``
    pairs). Raises what ``EarlyBirdCallback``, ``add_coefficients`` and ``prune_model`` raise."""
    bird = EarlyBirdCallback(**callback_kwargs)
    model = _unwrap(model)
    before = eb.count_parameters(model)
    eb.add_coefficients(model, head_l1=head_l1, ffn_l1=ffn_l1)
    trainer = make_trainer(bird)
    trainer.train()
    steps = trainer.state.global_step
    ticket_model(model, bird.initial_state, bird.ticket)
    heads, ffn = bird.ticket
    return {
        "stopped_at": bird.stopped_at,
        "search_steps": steps,
        "heads_kept": int(heads.sum()),
        "heads_total": heads.numel(),
        "ffn_kept": int(ffn.sum()),
        "ffn_total": ffn.numel(),
        "params_before": before,
        "params_after": eb.count_parameters(model),
        "ticket": eb._encoder(model).config.early_bird_ticket,
        "distances": [[step, d] for step, d in bird.distances],
    }


def start_line(max_steps, l1, draw_every):
    """The one line a run logs before its search: its length (``max_steps``; 0 or None: one epoch),
    the L1 weight and how often a ticket is drawn."""
    length = f"at most {max_steps} steps" if max_steps else "at most one epoch"
    return (
        f"EarlyBERT search: {length}, L1 {l1:g} on the head and FFN coefficients, a ticket drawn "
        f"every {draw_every} steps"
    )


def search_line(summary):
    """The one line a run logs after its search (``search``'s dict)."""
    r = summary
    stop = (
        f"stopped at step {r['stopped_at']} (early-bird test)"
        if r["stopped_at"] is not None
        else f"ran its {r['search_steps']} steps (no early-bird stop)"
    )
    return (
        f"EarlyBERT search {stop}: heads kept {r['heads_kept']}/{r['heads_total']}, FFN kept "
        f"{r['ffn_kept']}/{r['ffn_total']}, parameters {r['params_before'] / 1e6:.3f}M -> "
        f"{r['params_after'] / 1e6:.3f}M"
    )
