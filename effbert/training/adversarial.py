"""Adversarial fine-tuning on the word embeddings: FGM, PGD and FreeLB, as a
``transformers.Trainer`` mixin.

AT-BERT (the winning entry of the SDU@AAAI-21 acronym task) fine-tunes BERT with FGM and ensembles
the runs. The three methods, each as its usual code runs it:

* **FGM** (Miyato et al., "Adversarial Training Methods for Semi-Supervised Text Classification",
  ICLR 2017, in the form BERT fine-tuning code commonly uses): after the clean backward pass, the
  word-embedding *weight* is moved by ``epsilon * g / ||g||`` (``g`` its gradient, one norm over the
  whole matrix), the batch is run again and its gradient accumulated onto the clean one, and the
  weight is put back (copied back: exactly the old bits).
* **PGD** (Madry et al., ICLR 2018, in the same common form): ``steps`` ascent moves of ``alpha * g
  / ||g||`` on the word-embedding weight, each projected back onto the ``epsilon`` ball around the
  clean weight (one norm over the matrix); the moves in between use the adversarial gradient of the
  embedding only, and the parameters get the clean gradient plus the gradient at the last
  perturbation.
* **FreeLB** (Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural Language
  Understanding", ICLR 2020; zhuchen03/FreeLB ``run_glue_freelb.py``): a perturbation ``delta`` of
  the word-embedding *output*, one per example, started uniform in ``[-1, 1]`` times ``adv_init_mag
  / sqrt(length * hidden)`` on the real tokens (zero with ``adv_init_mag=0``), then ``steps``
  forward/backward passes, each loss divided by ``steps`` so that the parameters accumulate the mean
  gradient; between passes ``delta += adv_lr * grad / max(||grad||, 1e-8)`` per example, then each
  example's ``delta`` rescaled to ``adv_max_norm`` where its norm exceeds it (``0``: no bound;
  ``norm_type="linf"``: the infinity-norm step and a clamp). The dropout masks are the same in every
  pass (the published code hands ``dp_masks`` from pass to pass; here the random state is replayed).
  ``keep_clean=True`` (default) adds the clean loss's backward pass first: the published code trains
  on the perturbed inputs only, which its issue #10 measured to lose accuracy (SST-2, ALBERT-base:
  91.86 against 93.46 with the clean pass); ``False`` is the published behaviour.

Where the code differs from those sources, and why:

* "Per example" follows the texts, not the rows: with packed rows (``position_ids`` restarting at 0,
  transformers' ``DataCollatorWithFlattening``; effbert's models gather the real tokens into
  ``[total, hidden]`` described by ``cu_seqlens``) each text has its own norm, as each padded row
  has in the published code. Only real tokens are perturbed (the published code's padded slots have
  zero gradient and zero start, so its norms are the same).
* Under gradient accumulation FGM and PGD take the *micro-batch's own* embedding gradient (the
  common code reads ``param.grad``, which then also holds the earlier micro-batches'); so an
  accumulated step equals the sum of its micro-batches each run alone.
* A non-finite (NaN/inf) or zero gradient skips that perturbation (FGM/PGD: no move, as the common
  code's ``if norm != 0 and not isnan(norm)``; FreeLB: ``delta`` kept as it was), decided on the
  device without a host read; no NaN enters the weights through the perturbation.

Every pass goes through the Trainer's own ``compute_loss`` and ``training_step`` (autocast, fp16
loss scaling, the gradient-accumulation division, the model's multi-exit loss over every exit), so
the mixin works with a plain ``Trainer`` and with ``effbert.training.MultiExitTrainer`` alike::

    from effbert.training import MultiExitTrainer
    from effbert.training.adversarial import AdversarialConfig, with_adversarial

    trainer = with_adversarial(MultiExitTrainer)(model=model, args=args, train_dataset=ds,
                                                 adversarial=AdversarialConfig("fgm", epsilon=1.0))

The loss a step returns (what Trainer logs) is the clean loss where one is computed (FGM, PGD,
FreeLB with ``keep_clean``), else FreeLB's mean adversarial loss (what the published code logs).
Tested on one process; data-parallel runs (where each extra backward pass would also reduce the
gradients) are not tested yet.
"""

from dataclasses import dataclass

import torch

__all__ = [
    "ADVERSARIAL_METHODS",
    "NORM_TYPES",
    "AdversarialConfig",
    "AdversarialTrainingMixin",
    "with_adversarial",
    "input_embedding",
    "fgm_perturbation",
    "project_to_ball",
    "segment_norms",
    "freelb_init",
    "freelb_ascent",
]

ADVERSARIAL_METHODS = ("fgm", "pgd", "freelb")
NORM_TYPES = ("l2", "linf")


def _number(name, value, low=None, low_open=False, integer=False):
    kinds = (int,) if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or value != value
        or abs(value) == float("inf")
    ):
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")


@dataclass
class AdversarialConfig:
    """Which adversarial method and its settings (defaults: the common FGM/PGD code; FreeLB's SST-2
    launch line).

    ``method``: ``"fgm"``, ``"pgd"`` or ``"freelb"``. ``epsilon``: FGM's step and PGD's ball radius
    (L2 norm over the word-embedding matrix, in embedding units; 1.0). ``alpha``: PGD's step (0.3).
    ``steps``: PGD's K (3) and FreeLB's ascent passes (3). ``adv_lr`` (0.1), ``adv_init_mag`` (1.0),
    ``adv_max_norm`` (0.6; 0 = no bound) and ``norm_type`` (``"l2"`` or ``"linf"``): FreeLB's, per
    example. ``keep_clean``: FreeLB's added clean pass (True). ``same_dropout``: FreeLB's dropout
    masks reused over its passes (True). Raises ``ValueError`` naming the field.
    """

    method: str
    epsilon: float = 1.0
    alpha: float = 0.3
    steps: int = 3
    adv_lr: float = 0.1
    adv_init_mag: float = 1.0
    adv_max_norm: float = 0.6
    norm_type: str = "l2"
    keep_clean: bool = True
    same_dropout: bool = True

    def __post_init__(self):
        if self.method not in ADVERSARIAL_METHODS:
            raise ValueError(f"method must be one of {ADVERSARIAL_METHODS}, got {self.method!r}")
        _number("epsilon", self.epsilon, 0, low_open=True)
        _number("alpha", self.alpha, 0, low_open=True)
        _number("steps", self.steps, 1, integer=True)
        _number("adv_lr", self.adv_lr, 0)
        _number("adv_init_mag", self.adv_init_mag, 0)
        _number("adv_max_norm", self.adv_max_norm, 0)
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        for name in ("keep_clean", "same_dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


# -------------------------------------------------------------------------------------------------
# the math


def fgm_perturbation(grad, epsilon):
    """``epsilon * grad / ||grad||`` (one L2 norm over the whole tensor), or zeros where that norm
    is 0 or not finite (the common code's ``if norm != 0 and not isnan(norm)``, without a host
    read). ``grad``: any shape, floating point; the result has its shape and dtype. Raises
    ``ValueError`` for a non-tensor or a bad epsilon."""
    if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
        raise ValueError(f"grad must be a floating-point tensor, got {type(grad).__name__}")
    _number("epsilon", epsilon, 0, low_open=True)
    norm = torch.linalg.vector_norm(grad.float() if grad.dtype != torch.float64 else grad)
    ok = torch.isfinite(norm) & (norm != 0)
    safe = torch.where(ok, norm, torch.ones_like(norm))
    scale = torch.where(ok, epsilon / safe, torch.zeros_like(norm))
    return torch.where(ok, grad * scale.to(grad.dtype), torch.zeros_like(grad))


def project_to_ball(r, epsilon):
    """``r`` moved onto the L2 ball of radius ``epsilon`` (one norm over the tensor): ``epsilon * r
    / ||r||`` where ``||r|| > epsilon``, else ``r`` (the common PGD code's ``project``). Same shape
    and dtype as ``r``."""
    if not isinstance(r, torch.Tensor) or not r.is_floating_point():
        raise ValueError(f"r must be a floating-point tensor, got {type(r).__name__}")
    _number("epsilon", epsilon, 0, low_open=True)
    norm = torch.linalg.vector_norm(r.float() if r.dtype != torch.float64 else r)
    over = norm > epsilon
    factor = epsilon / torch.where(over, norm, torch.ones_like(norm))
    return torch.where(over, r * factor.to(r.dtype), r)


def _check_packed(name, x, cu_seqlens):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point [total, hidden] tensor, got "
            f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if (
        not isinstance(cu_seqlens, torch.Tensor)
        or cu_seqlens.dim() != 1
        or cu_seqlens.shape[0] < 2
        or cu_seqlens.is_floating_point()
    ):
        raise ValueError("cu_seqlens must be an integer [S + 1] tensor")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens must be on {x.device}, got {cu_seqlens.device}")


def _segments(cu_seqlens, total):
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    texts = torch.arange(lengths.shape[0], device=cu_seqlens.device)
    return torch.repeat_interleave(texts, lengths, output_size=total), lengths


def segment_norms(x, cu_seqlens, norm_type="l2"):
    """Each text's norm over all its tokens and features: ``x [total, hidden]`` packed real tokens,
    text ``s`` rows ``cu_seqlens[s]:cu_seqlens[s + 1]`` (int ``[S + 1]``, flash-attn's convention);
    returns ``[S]`` float32 (float64 for float64 ``x``). ``norm_type``: ``"l2"`` or ``"linf"``. An
    empty text has norm 0. The published FreeLB takes these norms per padded row (``delta.view(B,
    -1).norm(dim=1)``)."""
    _check_packed("x", x, cu_seqlens)
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    seg, lengths = _segments(cu_seqlens, x.shape[0])
    out = torch.zeros(lengths.shape[0], dtype=dtype, device=x.device)
    if norm_type == "l2":
        return out.index_add(0, seg, x.to(dtype).square().sum(-1)).sqrt()
    return out.index_reduce(0, seg, x.to(dtype).abs().amax(-1), "amax", include_self=True)


def freelb_init(shape_like, cu_seqlens, adv_init_mag, norm_type="l2", generator=None):
    """FreeLB's starting perturbation of packed real tokens ``[total, hidden]`` (the dtype and
    device of ``shape_like``): ``uniform(-1, 1) * adv_init_mag / sqrt(length * hidden)`` per text
    (``"l2"``) or ``uniform(-adv_init_mag, adv_init_mag)`` (``"linf"``); zeros for
    ``adv_init_mag=0``. ``run_glue_freelb.py``'s ``input_lengths`` are here each text's length
    (``cu_seqlens``)."""
    _check_packed("shape_like", shape_like, cu_seqlens)
    _number("adv_init_mag", adv_init_mag, 0)
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")
    x = shape_like
    if adv_init_mag == 0:
        return torch.zeros_like(x)
    u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator) * 2 - 1
    if norm_type == "linf":
        return u * adv_init_mag
    seg, lengths = _segments(cu_seqlens, x.shape[0])
    mag = adv_init_mag / (lengths.clamp_min(1) * x.shape[-1]).to(x.dtype).sqrt()
    return u * mag.index_select(0, seg)[:, None]


def freelb_ascent(delta, grad, cu_seqlens, adv_lr, adv_max_norm=0.0, norm_type="l2"):
    """One FreeLB ascent step on packed ``delta [total, hidden]`` with its gradient ``grad`` (same
    shape): per text, ``delta + adv_lr * grad / max(||grad||, 1e-8)``, then (``adv_max_norm > 0``)
    L2: each text rescaled to ``adv_max_norm`` where its norm exceeds it; linf: clamped to
    ``[-adv_max_norm, adv_max_norm]``. A ``grad`` with a NaN or inf anywhere leaves ``delta`` as it
    is (decided on the device). Returns the new ``delta``, detached."""
    _check_packed("delta", delta, cu_seqlens)
    if not isinstance(grad, torch.Tensor) or grad.shape != delta.shape:
        got = list(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"grad must have delta's shape {list(delta.shape)}, got {got}")
    _number("adv_lr", adv_lr, 0)
    _number("adv_max_norm", adv_max_norm, 0)
    delta, grad = delta.detach(), grad.detach()
    seg, _ = _segments(cu_seqlens, delta.shape[0])
    denorm = segment_norms(grad, cu_seqlens, norm_type).clamp_min(1e-8).to(delta.dtype)
    new = delta + adv_lr * grad / denorm.index_select(0, seg)[:, None]
    if adv_max_norm > 0:
        if norm_type == "l2":
            norm = segment_norms(new, cu_seqlens, "l2").to(delta.dtype)
            exceed = (norm > adv_max_norm).to(delta.dtype)
            reweights = adv_max_norm / norm.clamp_min(1e-30) * exceed + (1 - exceed)
            new = new * reweights.index_select(0, seg)[:, None]
        else:
            new = new.clamp(-adv_max_norm, adv_max_norm)
    return torch.where(torch.isfinite(grad).all(), new, delta)


# ------------------------------------------------------------------------------------------ the
# model's side


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, FSDP wrappers
        model = model.module
    return model


def input_embedding(model):
    """The word-embedding ``nn.Embedding`` of ``model``: ``get_input_embeddings()`` (transformers
    models, effbert's TUPE models), else ``model.embeddings.word_embeddings``
    (``effbert.integrations.hf.MultiExitBert``). Raises ``ValueError`` when neither is there."""
    core = _unwrap(model)
    emb = None
    if hasattr(core, "get_input_embeddings"):
        try:
            emb = core.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            emb = None
    if emb is None:
        emb = getattr(getattr(core, "embeddings", None), "word_embeddings", None)
    if not isinstance(emb, torch.nn.Embedding):
        raise ValueError(
            f"model ({type(core).__name__}) has no word-embedding nn.Embedding "
            "(get_input_embeddings() or .embeddings.word_embeddings)"
        )
    return emb


def _batch_packing(inputs):
    """Where the batch's texts are: ``(indices [total] flat [B * N] slots, cu_seqlens [S + 1])``
    from ``input_ids``, ``attention_mask`` and ``position_ids``, as effbert's models pack them
    (``unpad_input``)."""
    from ..models.packing import unpad_input

    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("inputs must hold input_ids [B, N] for FreeLB's per-example perturbation")
    mask = inputs.get("attention_mask")
    mask = mask.bool() if mask is not None else None
    packing = unpad_input(
        mask, inputs.get("position_ids"), shape=tuple(ids.shape), device=ids.device
    )
    return packing.indices, packing.cu_seqlens


class _DeltaHook:
    """Adds FreeLB's packed ``delta [total, hidden]`` to the word-embedding output, whichever layout
    the model embeds in: ``[total, hidden]`` (effbert's models embed the packed real tokens) or
    ``[B, N, hidden]``."""

    def __init__(self, indices, cu_seqlens, slots, config):
        self.indices, self.cu_seqlens, self.slots, self.config = indices, cu_seqlens, slots, config
        self.delta = None  # the leaf of the current pass (requires grad)

    def __call__(self, module, args, out):
        total = self.indices.shape[0]
        if out.dim() == 2 and out.shape[0] == total:
            padded = False
        elif out.dim() == 3 and out.shape[0] * out.shape[1] == self.slots:
            padded = True
        else:
            raise ValueError(
                f"the word-embedding output {list(out.shape)} fits neither the packed "
                f"real tokens [{total}, hidden] nor the padded batch ({self.slots} "
                "slots)"
            )
        if self.delta is None:
            dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
            like = out.new_empty((total, out.shape[-1]), dtype=dtype)
            self.delta = freelb_init(
                like, self.cu_seqlens, self.config.adv_init_mag, self.config.norm_type
            ).requires_grad_()
        d = self.delta.to(out.dtype)
        if not padded:
            return out + d
        return out.reshape(-1, out.shape[-1]).index_add(0, self.indices, d).view(out.shape)


class AdversarialTrainingMixin:
    """Put before a ``transformers.Trainer`` class (``class T(AdversarialTrainingMixin,
    MultiExitTrainer)``, or ``with_adversarial(MultiExitTrainer)``):
    ``adversarial=AdversarialConfig(...)`` (or None: the class trains as its base) runs FGM, PGD or
    FreeLB in ``training_step`` (see the module docstring). Raises ``ValueError`` for an
    ``adversarial`` that is not an ``AdversarialConfig``, or with ``MultiExitTrainer``'s
    ``grad_reg`` (its own two backward passes bypass ``compute_loss``)."""

    def __init__(self, *args, adversarial=None, **kwargs):
        if adversarial is not None and not isinstance(adversarial, AdversarialConfig):
            raise ValueError(
                "adversarial must be an AdversarialConfig or None, got "
                f"{type(adversarial).__name__}"
            )
        if adversarial is not None and kwargs.get("grad_reg"):
            raise ValueError(
                "adversarial training does not combine with grad_reg (RomeBERT's "
                "projection runs its own backward passes)"
            )
        super().__init__(*args, **kwargs)
        self.adversarial = adversarial
        self._loss_factor = None  # FreeLB: each pass's loss divided by the number of passes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self._loss_factor is None or not model.training:
            return out
        if return_outputs:
            return out[0] * self._loss_factor, out[1]
        return out * self._loss_factor

    def training_step(self, model, inputs, num_items_in_batch=None):
        cfg = self.adversarial
        if cfg is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if cfg.method == "freelb":
            return self._freelb_step(model, inputs, num_items_in_batch)
        return self._weight_step(model, inputs, num_items_in_batch)

    # --- FGM and PGD: the word-embedding weight
    # ----------------------------------------------------------------

    def _embedding_grad(self, model, inputs, num_items_in_batch, weight):
        """The gradient of the micro-batch's loss with respect to ``weight`` only (PGD's inner
        moves)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)
        # as the full backward would be scaled (a common factor: the same direction)
        if scaler is not None:
            loss = scaler.scale(loss)
        (grad,) = torch.autograd.grad(loss, weight, allow_unused=True)
        return grad if grad is not None else torch.zeros_like(weight)

    def _weight_step(self, model, inputs, num_items_in_batch):
        cfg = self.adversarial
        weight = input_embedding(model).weight
        before = weight.grad.detach().clone() if weight.grad is not None else None
        loss = super().training_step(model, inputs, num_items_in_batch)  # the clean pass
        if weight.grad is None:
            return loss  # a frozen embedding: nothing to perturb
        grad = weight.grad.detach() - before if before is not None else weight.grad.detach().clone()
        backup = weight.detach().clone()
        try:
            if cfg.method == "fgm":
                with torch.no_grad():
                    weight.add_(fgm_perturbation(grad, cfg.epsilon))
                # accumulates onto the clean gradient
                super().training_step(model, inputs, num_items_in_batch)
            else:
                for t in range(cfg.steps):
                    with torch.no_grad():
                        moved = weight + fgm_perturbation(grad, cfg.alpha)
                        weight.copy_(backup + project_to_ball(moved - backup, cfg.epsilon))
                    if t < cfg.steps - 1:
                        grad = self._embedding_grad(model, inputs, num_items_in_batch, weight)
                    else:
                        super().training_step(model, inputs, num_items_in_batch)
        finally:
            with torch.no_grad():
                weight.copy_(backup)
        return loss

    # --- FreeLB: the word-embedding output
    # -----------------------------------------------------------------------

    def _freelb_step(self, model, inputs, num_items_in_batch):
        cfg = self.adversarial
        module = input_embedding(model)
        prepared = self._prepare_inputs(inputs)
        indices, cu_seqlens = _batch_packing(prepared)
        device = module.weight.device
        cuda = device.type == "cuda"
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
        clean = None
        if cfg.keep_clean:
            clean = super().training_step(model, inputs, num_items_in_batch)
        hook = _DeltaHook(indices, cu_seqlens, prepared["input_ids"].numel(), cfg)
        handle = module.register_forward_hook(hook)
        self._loss_factor = 1.0 / cfg.steps
        total = None
        try:
            for step in range(cfg.steps):
                if cfg.same_dropout:  # the same dropout masks in every pass (FreeLB's dp_masks)
                    torch.set_rng_state(rng[0])
                    if cuda:
                        torch.cuda.set_rng_state(rng[1], device)
                loss = super().training_step(model, inputs, num_items_in_batch)
                total = loss if total is None else total + loss
                if step == cfg.steps - 1:
                    break
                delta = hook.delta
                grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
                new = freelb_ascent(
                    delta.detach(), grad, cu_seqlens, cfg.adv_lr, cfg.adv_max_norm, cfg.norm_type
                )
                hook.delta = new.requires_grad_()
        finally:
            handle.remove()
            self._loss_factor = None
        return clean if clean is not None else total


def with_adversarial(trainer_class):
    """``trainer_class`` (a ``transformers.Trainer`` subclass, or ``Trainer``) with
    ``AdversarialTrainingMixin`` in front: a new class named ``Adversarial<name>``. Raises
    ``ValueError`` for anything else."""
    from transformers import Trainer

    if not isinstance(trainer_class, type) or not issubclass(trainer_class, Trainer):
        raise ValueError(
            f"trainer_class must be a transformers.Trainer subclass, got {trainer_class!r}"
        )
    if issubclass(trainer_class, AdversarialTrainingMixin):
        return trainer_class
    name = f"Adversarial{trainer_class.__name__}"
    return type(name, (AdversarialTrainingMixin, trainer_class), {})
