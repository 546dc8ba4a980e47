"""Pretraining effbert's models with ``transformers.Trainer``: the pieces a plain ``Trainer`` lacks.

``PretrainingTrainer`` is a ``Trainer`` for ``TupeBertForMaskedLM`` and ``TupeBertForMultiChoicePretraining``
(MC-BERT). Everything else (mixed precision, gradient accumulation, checkpoints and resuming, logging, torchrun DDP,
FSDP, DeepSpeed) is Trainer's own, driven by its ``TrainingArguments``. What it adds:

* **TNF's note update** (Wu et al., "Taking Notes on the Fly Helps Language Pre-Training", ICLR 2021): after the
  backward pass of every micro-batch, the rare-word spans of the batch (``note_spans``, from
  ``effbert.data``'s collator) fold the last hidden state into the model's notes (``model.update_notes``). Under
  data parallel every rank applies every rank's spans in rank order (``process_group``), so the notes stay identical
  on all ranks without broadcasting them (pass ``ddp_broadcast_buffers=False``).
* **The masked-LM loss at the labelled positions only** (``return_logits=False``: no ``[B, N, vocab]`` logits), as
  the mean over all masked tokens of the optimizer step: each rank's sum divided by the step's target count over
  every micro-batch and rank, so the update equals the one of a single process on the whole batch. MC-BERT's loss
  likewise: the controller's masked-LM loss summed over the step's ``[MASK]`` tokens and divided by their count (as
  the published fairseq criterion's ``sample_size`` divides it), plus lambda x the multi-choice cross-entropy summed
  over the step's real tokens and divided by their count (fairseq weights each micro-batch's multi-choice mean by
  its share of the step's ``[MASK]`` tokens instead: the same for a step of one micro-batch; docs/pretrain.md).
* **Logged metrics**: ``notes_taken`` with TNF; with MC-BERT ``mlm_loss``, ``mc_loss``, ``mc_accuracy``,
  ``mc_replaced_accuracy``, ``replaced_fraction``, and the cloze part at the replaced tokens, ``mc_choice_accuracy``
  beside its chance level ``mc_choice_chance`` (means over the micro-batches since the last log and over ranks).
* **A stop on non-finite values**: a NaN or infinite loss raises ``NonFiniteError`` at that step on every rank
  (Trainer would silently replace it in the logged mean and go on), and ``StopOnNonFinite`` (added by default)
  refuses to write a checkpoint of non-finite weights or notes.

    from transformers import TrainingArguments
    from effbert.training import PretrainingTrainer
    trainer = PretrainingTrainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                                 data_collator=DataCollatorForTupeMLM(tokenizer, rare_words=table))
    trainer.train()

Weight decay: on every parameter of two or more dimensions (matrices, embeddings), as BERT decays; never on biases,
LayerNorm gains or TUPE's per-head [CLS] scalars (Trainer's default rule would decay those scalars).
"""

import inspect

import torch
from transformers import Trainer, TrainerCallback

from ..models.multi_exit import EXIT_LOSSES

__all__ = [
    "PretrainingTrainer",
    "StopOnNonFinite",
    "NonFiniteError",
    "MC_METRICS",
    "MultiExitTrainer",
    "EXIT_LOSSES",
]

MC_METRICS = (
    "mlm_loss",
    "mc_loss",
    "mc_accuracy",
    "mc_replaced_accuracy",
    "replaced_fraction",
    "mc_choice_accuracy",
    "mc_choice_chance",
)


# transformers >= 5.2x asks a Trainer whose compute_loss already takes its share of the optimizer step to say so
# (``loss_is_scaled_for_ga``); earlier 5.x releases decide from the model's signature and the step's item count
# whether to divide the loss by the micro-batch count. Both trainers below return the loss already divided, so they
# must know which rule the installed Trainer follows, not assume one (found on transformers 5.17, where an update with
# gradient accumulation was 1/4 of the whole-batch one).
_TRAINER_HAS_SCALED_FLAG = hasattr(Trainer, "loss_is_scaled_for_ga")


def _undo_trainer_division(trainer, loss, num_items_in_batch):
    """``loss``, already this micro-batch's share of the step, times what the installed Trainer's ``training_step``
    will divide it by afterwards (1 where it divides by nothing), so that exactly ``loss`` is backpropagated."""
    if _TRAINER_HAS_SCALED_FLAG:
        return loss  # the class attribute loss_is_scaled_for_ga = True: Trainer leaves it as it is
    divides = (
        not trainer.model_accepts_loss_kwargs or num_items_in_batch is None
    ) and trainer.compute_loss_func is None
    return loss * trainer.current_gradient_accumulation_steps if divides else loss


def _mc_counts(batch, mask_token_id):
    """MC-BERT's two divisors in one batch: its ``[MASK]`` tokens (where the controller's masked-LM loss is taken)
    and its real tokens (where the multi-choice loss is), as ``TupeBertForMultiChoicePretraining`` counts them."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return ((ids == mask_token_id) & real).sum(), real.sum()


class NonFiniteError(FloatingPointError):
    """Training met a NaN or infinite loss or weights; ``step`` is the optimizer step (1-based) where it did."""

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, FSDP wrappers
        model = model.module
    return model


def _all_finite(model):
    """True when every floating-point parameter and buffer (TNF's notes included) is finite."""
    tensors = [
        t
        for t in list(model.parameters()) + list(model.buffers())
        if t.is_floating_point() and t.numel()
    ]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class StopOnNonFinite(TrainerCallback):
    """Before Trainer writes a checkpoint, check that the weights and notes are finite; if not, raise
    ``NonFiniteError``, so the checkpoints already written stay the last good ones. Every rank holds the same
    weights under data parallel, so every rank raises at the same step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None and not _all_finite(_unwrap(model)):
            raise NonFiniteError(
                f"non-finite weights after step {state.global_step}", state.global_step
            )
        return control


class PretrainingTrainer(Trainer):
    """A ``transformers.Trainer`` for effbert's pretraining models (see the module docstring).

    Batches are the dicts of ``effbert.data``'s ``DataCollatorForTupeMLM``: ``input_ids``, ``attention_mask``,
    ``labels`` (-100 = no target), and optionally ``position_ids`` (packed rows), ``note_slots [B, N]`` and
    ``note_spans [M, 4]`` (TNF). ``note_spans`` never reaches the model's forward: it feeds the note update.
    ``stop_on_nonfinite=True`` raises ``NonFiniteError`` on a non-finite loss and adds ``StopOnNonFinite``.
    Other arguments are ``Trainer``'s.
    """

    # compute_loss normalises by the step's target counts itself
    loss_is_scaled_for_ga = True

    def __init__(self, *args, stop_on_nonfinite=True, **kwargs):
        if not isinstance(stop_on_nonfinite, bool):
            raise TypeError(
                f"stop_on_nonfinite must be a bool, got {type(stop_on_nonfinite).__name__}"
            )
        super().__init__(*args, **kwargs)
        self.stop_on_nonfinite = stop_on_nonfinite
        if stop_on_nonfinite and not any(
            isinstance(c, StopOnNonFinite) for c in self.callback_handler.callbacks
        ):
            self.add_callback(StopOnNonFinite())
        self._metric_sums = {}
        self._metric_count = 0
        self._last_hidden = None
        self._step_tokens = (
            None  # MC-BERT: the real tokens of the step (the multi-choice loss's divisor)
        )

    def _get_train_sampler(self, train_dataset=None):
        # Trainer's RandomSampler holds every row index of an epoch as a Python list (about 36 bytes a row):
        # memory that grows with the corpus. ShuffleSampler computes its permutation on the fly, keyed by
        # (data_seed, epoch), identical on every rank. Other strategies (group_by_length, ...) stay Trainer's.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "train_sampling_strategy", "random") != "random" or dataset is None:
            return super()._get_train_sampler(train_dataset)
        try:
            len(dataset)
        except TypeError:
            return super()._get_train_sampler(train_dataset)
        from ..data.sampler import ShuffleSampler

        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ShuffleSampler(dataset, seed=seed)

    # ---------------------------------------------------------------------------------------------- the loss

    def get_decay_parameter_names(self, model):
        return [n for n, p in model.named_parameters() if p.dim() >= 2]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # the masked targets of the whole optimizer step, over every micro-batch and (with average_tokens_across_
        # devices, Trainer's default) every rank: the divisor of the masked-LM loss
        # (MC-BERT: the [MASK] tokens, its controller's targets, and the real tokens, the multi-choice targets)
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = self._step_tokens = None
        if batches and all(isinstance(b, dict) and "labels" in b for b in batches):
            if self._is_multi_choice(self.model):
                mask_id = _unwrap(self.model).mask_token_id
                count = (
                    torch.stack([torch.stack(_mc_counts(b, mask_id)) for b in batches])
                    .sum(0)
                    .to(device)
                )
            else:
                count = sum(b["labels"].ne(-100).sum() for b in batches).to(device).reshape(1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.reshape(1, -1)).sum(0)
            if count.numel() == 2:
                self._step_tokens = count[1]
            count = count[0]
        return batches, count

    def _is_multi_choice(self, model):
        from ..models import TupeBertForMultiChoicePretraining

        return isinstance(_unwrap(model), TupeBertForMultiChoicePretraining)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("note_spans", None)
        core = _unwrap(model)
        multi_choice = self._is_multi_choice(model)
        if (
            not multi_choice
            and "return_logits" in inspect.signature(core.forward).parameters
            and inputs.get("labels") is not None
            and not return_outputs
        ):
            inputs["return_logits"] = False  # the head at the labelled positions only
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError("the model returned no loss: the batch needs labels")
        if not model.training:  # evaluation: the model's own mean over the batch
            return (loss, outputs) if return_outputs else loss
        hidden = outputs.get("last_hidden_state") if isinstance(outputs, dict) else None
        self._last_hidden = hidden.detach() if hidden is not None else None
        self._record_metrics(core, outputs, multi_choice)
        if num_items_in_batch is None or (multi_choice and self._step_tokens is None):
            # the model's own means, averaged over the micro-batches of the step (and over ranks by DDP)
            loss = loss / self.current_gradient_accumulation_steps
        else:
            step = torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1)
            if multi_choice:  # each term over its own targets of the whole step
                masked, real = _mc_counts(inputs, core.mask_token_id)
                loss = outputs["mlm_loss"] * masked / step + core.loss_lambda * outputs[
                    "mc_loss"
                ] * real / self._step_tokens.to(loss.device).clamp_min(1)
            else:
                loss = loss * inputs["labels"].ne(-100).sum() / step
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = (
                    loss * self.args.world_size
                )  # DDP averages the gradients over ranks; the divisor held all
        loss = _undo_trainer_division(self, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _record_metrics(self, core, outputs, multi_choice):
        sums = self._metric_sums
        if multi_choice:
            for key in MC_METRICS:
                value = outputs.get(key)
                if value is not None:
                    v = value.detach().double().reshape(())
                    sums[key] = sums[key] + v if key in sums else v
        self._metric_count += 1

    # ------------------------------------------------------------------------------------- the training step

    def training_step(self, model, inputs, num_items_in_batch=None):
        spans = inputs.get("note_spans") if isinstance(inputs, dict) else None
        if spans is not None:
            inputs = {k: v for k, v in inputs.items() if k != "note_spans"}
        self._last_hidden = None
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward and backward
        step = self.state.global_step + 1
        if self.stop_on_nonfinite:
            bad = (~torch.isfinite(loss)).to(torch.float32).reshape(1)
            if (
                self.args.world_size > 1
                and torch.distributed.is_available()
                and torch.distributed.is_initialized()
            ):
                torch.distributed.all_reduce(
                    bad, op=torch.distributed.ReduceOp.MAX
                )  # every rank stops together
            if bool(bad.item()):
                value = float(loss) if not bool(torch.isfinite(loss)) else float("nan")
                raise NonFiniteError(f"the loss is {value} at step {step}", step)
        core = _unwrap(model)
        if spans is not None and getattr(core, "notes", None) is not None:
            if self._last_hidden is None:
                raise ValueError(
                    "note_spans need the model's last_hidden_state (TupeBertForMaskedLM returns it)"
                )
            self._update_notes(core, self._last_hidden, spans, inputs)
        self._last_hidden = None
        return loss

    def _update_notes(self, core, hidden, spans, inputs):
        group = None
        if (
            self.args.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            group = torch.distributed.group.WORLD
        mask = inputs.get("attention_mask")
        lengths = mask.sum(1).to(hidden.device) if mask is not None else None  # right-padded rows
        kwargs = {}
        if (
            inputs.get("position_ids") is not None
            and "position_ids" in inspect.signature(core.update_notes).parameters
        ):
            kwargs["position_ids"] = inputs["position_ids"].to(hidden.device)
        core.update_notes(hidden, spans.to(hidden.device), lengths, process_group=group, **kwargs)

    # ---------------------------------------------------------------------------------------------- logging

    def log(self, logs, start_time=None):
        if (
            "loss" in logs and self._metric_count
        ):  # a training log: add the means since the last one
            keys = sorted(self._metric_sums)
            if keys:
                device = self._metric_sums[keys[0]].device
                means = (
                    torch.stack([self._metric_sums[k] for k in keys]).to(device)
                    / self._metric_count
                )
                if self.args.world_size > 1:
                    means = self.accelerator.gather(means.reshape(1, -1)).mean(0)
                logs.update({k: float(v) for k, v in zip(keys, means.tolist())})
            self._metric_sums, self._metric_count = {}, 0
            notes = getattr(_unwrap(self.model), "notes", None)
            if notes is not None:
                logs["notes_taken"] = int((notes.counts > 0).sum())
        super().log(logs, start_time)


# ------------------------------------------------------------------------------------------------ early exit


class MultiExitTrainer(Trainer):
    """A ``transformers.Trainer`` for a multi-exit classifier (``TupeBertForSequenceClassification`` with
    ``config.multi_exit``) that adds what a plain ``Trainer`` cannot do: RomeBERT's gradient
    regularization, which needs two backward passes (``training_step``). The loss is the model's
    own, as for any transformers model: ``model(..., labels=...)`` returns the loss its config names
    (``effbert.models.multi_exit``: RomeBERT's self-distillation, PABEE's layer-weighted loss or
    DeeBERT's loss of the model's stage); this Trainer only divides it over the micro-batches of a
    step.

    ``loss``, ``gamma``, ``temperature``, ``gradient_equilibrium``: when given, set the model's
    ``config.exit_loss``, ``exit_loss_gamma``, ``exit_loss_temperature``,
    ``exit_gradient_equilibrium`` (None: the config's as they are). ``stage``: with the DeeBERT
    loss, ``model.set_deebert_stage(stage)`` (stage 2 freezes the backbone and the last exit before
    the optimizer, built by ``train``, collects the trainable weights); ignored for the other
    losses. ``grad_reg``: RomeBERT's ``--gp`` (``effbert.losses.gradient_regularized_backward``, one
    projection of the concatenated gradients of every layer but the last; ``project`` "others" or
    "final"); classification with the ``"romebert"`` loss only, on one process (its two backward
    passes bypass data-parallel gradient averaging). ``projected`` counts the steps whose gradients
    were projected (a device tensor: no host sync). ``exit_loss``: the model's loss settings (a
    dict, read from the model). Batches are ``input_ids``, ``attention_mask`` and ``labels [B]``
    (``DataCollatorWithPadding``'s). Weight decay goes on matrices and embeddings only, as for
    ``PretrainingTrainer``. Raises ``ValueError`` / ``TypeError`` naming the argument for a value
    outside these, before changing the model. Sources: romebert/RomeBERT
    (``new_run_highway_glue.py``), JetRunner/PABEE, castorini/DeeBERT.
    """

    def __init__(
        self,
        *args,
        loss=None,
        gamma=None,
        temperature=None,
        gradient_equilibrium=None,
        stage=None,
        grad_reg=False,
        project="others",
        **kwargs,
    ):
        from ..losses import PROJECT_SIDES
        from ..models.multi_exit import check_deebert_stage, check_exit_loss_settings

        model = kwargs.get("model", args[0] if args else None)
        config = getattr(model, "config", None)
        core = _unwrap(model)
        given = dict(
            exit_loss=loss,
            exit_loss_gamma=gamma,
            exit_loss_temperature=temperature,
            exit_gradient_equilibrium=gradient_equilibrium,
        )
        given = {k: v for k, v in given.items() if v is not None}
        # every argument is checked before the model's config or parameters change
        if given:
            check_exit_loss_settings(
                "romebert" if loss is None else loss,
                0.9 if gamma is None else gamma,
                3.0 if temperature is None else temperature,
                given.get("exit_gradient_equilibrium", False),
            )
        if stage is not None:
            check_deebert_stage(stage)
        if project not in PROJECT_SIDES:
            raise ValueError(f"project must be one of {PROJECT_SIDES}, got {project!r}")
        if not isinstance(grad_reg, bool):
            raise TypeError(f"grad_reg must be a bool, got {type(grad_reg).__name__}")
        if not getattr(config, "multi_exit", False) or getattr(core, "exits", None) is None:
            raise ValueError("model must be a multi-exit classifier (config.multi_exit=True)")
        effective = given.get("exit_loss", config.exit_loss) or "romebert"
        if grad_reg and (effective != "romebert" or config.num_labels == 1):
            raise ValueError("grad_reg goes with loss='romebert' and a classification head")
        super().__init__(*args, **kwargs)
        if grad_reg and self.args.world_size > 1:
            raise ValueError(
                "grad_reg runs on one process: its two backward passes bypass data-parallel gradient "
                "averaging"
            )
        for key, value in given.items():
            setattr(config, key, value)
        if stage is not None and effective == "deebert":
            core.set_deebert_stage(stage)
        self.grad_reg, self.project = grad_reg, project
        self.projected = None

    @property
    def exit_loss(self):
        """The model's loss settings: ``loss``, ``gamma``, ``temperature``,
        ``gradient_equilibrium``, ``backend`` and DeeBERT's ``stage``."""
        core = _unwrap(self.model)
        return dict(core.exit_loss_settings(), stage=core.deebert_stage)

    def get_decay_parameter_names(self, model):
        # never on biases, LayerNorm gains or TUPE's per-head [CLS] scalars (Trainer's default rule decays those)
        return [n for n, p in model.named_parameters() if p.dim() >= 2]

    # compute_loss returns each micro-batch's mean divided by the step's micro-batch count, as Trainer would divide it
    loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)  # the model's own loss, from the labels in the batch
        loss = outputs["loss"]
        if loss is None:
            raise ValueError("the model returned no loss: the batch needs labels")
        if model.training:
            loss = _undo_trainer_division(
                self, loss / self.current_gradient_accumulation_steps, num_items_in_batch
            )
        z = outputs["exit_logits"]
        return (loss, {"logits": z[-1], "exit_logits": z}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.grad_reg:
            return super().training_step(model, inputs, num_items_in_batch)
        from ..losses import gradient_regularized_backward, romebert_projected_parameters

        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
            loss, z = outputs["loss"], outputs["exit_logits"].float()
            # the teacher is detached, so the last exit's only term is its cross-entropy: the rest is the others'
            # (gradient equilibrium scales the last exit by 1: its cross-entropy is the same either way)
            final = torch.nn.functional.cross_entropy(z[-1], inputs["labels"])
        # as Trainer does: the mean over the step's micro-batches, and fp16's loss scale (the projection coefficient
        # is the same for any common factor of both sides)
        scale = 1.0 / self.current_gradient_accumulation_steps
        final, other = final * scale, (loss - final) * scale
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            final, other = scaler.scale(final), scaler.scale(other)
        core = _unwrap(model)
        params = [p for p in core.parameters() if p.requires_grad]
        did = gradient_regularized_backward(
            final,
            other,
            params,
            romebert_projected_parameters(core.bert.encoder),
            project=self.project,
        ).long()
        self.projected = did if self.projected is None else self.projected + did
        return (loss * scale).detach()
