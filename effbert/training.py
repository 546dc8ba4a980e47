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
  every micro-batch and rank, so the update equals the one of a single process on the whole batch. MC-BERT's loss is
  the model's own (controller MLM + lambda x multi-choice cross-entropy, means per micro-batch), averaged.
* **Logged metrics**: ``notes_taken`` with TNF; with MC-BERT ``mlm_loss``, ``mc_loss``, ``mc_accuracy``,
  ``mc_replaced_accuracy`` and ``replaced_fraction`` (means over the steps since the last log and over ranks).
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

__all__ = ["PretrainingTrainer", "StopOnNonFinite", "NonFiniteError", "MC_METRICS"]

MC_METRICS = ("mlm_loss", "mc_loss", "mc_accuracy", "mc_replaced_accuracy", "replaced_fraction")


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
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class StopOnNonFinite(TrainerCallback):
    """Before Trainer writes a checkpoint, check that the weights and notes are finite; if not, raise
    ``NonFiniteError``, so the checkpoints already written stay the last good ones. Every rank holds the same
    weights under data parallel, so every rank raises at the same step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None and not _all_finite(_unwrap(model)):
            raise NonFiniteError(f"non-finite weights after step {state.global_step}", state.global_step)
        return control


class PretrainingTrainer(Trainer):
    """A ``transformers.Trainer`` for effbert's pretraining models (see the module docstring).

    Batches are the dicts of ``effbert.data``'s ``DataCollatorForTupeMLM``: ``input_ids``, ``attention_mask``,
    ``labels`` (-100 = no target), and optionally ``position_ids`` (packed rows), ``note_slots [B, N]`` and
    ``note_spans [M, 4]`` (TNF). ``note_spans`` never reaches the model's forward: it feeds the note update.
    ``stop_on_nonfinite=True`` raises ``NonFiniteError`` on a non-finite loss and adds ``StopOnNonFinite``.
    Other arguments are ``Trainer``'s.
    """

    # compute_loss normalises by the step's target count (MLM) or the number of micro-batches (MC-BERT) itself
    loss_is_scaled_for_ga = True

    def __init__(self, *args, stop_on_nonfinite=True, **kwargs):
        if not isinstance(stop_on_nonfinite, bool):
            raise TypeError(f"stop_on_nonfinite must be a bool, got {type(stop_on_nonfinite).__name__}")
        super().__init__(*args, **kwargs)
        self.stop_on_nonfinite = stop_on_nonfinite
        if stop_on_nonfinite and not any(isinstance(c, StopOnNonFinite) for c in self.callback_handler.callbacks):
            self.add_callback(StopOnNonFinite())
        self._metric_sums = {}
        self._metric_count = 0
        self._last_hidden = None

    # ---------------------------------------------------------------------------------------------- the loss

    def get_decay_parameter_names(self, model):
        return [n for n, p in model.named_parameters() if p.dim() >= 2]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # the masked targets of the whole optimizer step, over every micro-batch and (with average_tokens_across_
        # devices, Trainer's default) every rank: the divisor of the masked-LM loss
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = None
        if batches and all(isinstance(b, dict) and "labels" in b for b in batches):
            count = sum(b["labels"].ne(-100).sum() for b in batches).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    def _is_multi_choice(self, model):
        from .models import TupeBertForMultiChoicePretraining

        return isinstance(_unwrap(model), TupeBertForMultiChoicePretraining)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("note_spans", None)
        core = _unwrap(model)
        multi_choice = self._is_multi_choice(model)
        if not multi_choice and "return_logits" in inspect.signature(core.forward).parameters and \
                inputs.get("labels") is not None and not return_outputs:
            inputs["return_logits"] = False  # the head at the labelled positions only
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError("the model returned no loss: the batch needs labels")
        if model.training:
            hidden = outputs.get("last_hidden_state") if isinstance(outputs, dict) else None
            self._last_hidden = hidden.detach() if hidden is not None else None
            self._record_metrics(core, outputs, multi_choice)
        if multi_choice or num_items_in_batch is None:
            # the model's own means, averaged over the micro-batches of the step (and over ranks by DDP)
            loss = loss / self.current_gradient_accumulation_steps
        else:
            targets = inputs["labels"].ne(-100).sum()
            loss = loss * targets / torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size  # DDP averages the gradients over ranks; the divisor held all
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
            if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # every rank stops together
            if bool(bad.item()):
                value = float(loss) if not bool(torch.isfinite(loss)) else float("nan")
                raise NonFiniteError(f"the loss is {value} at step {step}", step)
        core = _unwrap(model)
        if spans is not None and getattr(core, "notes", None) is not None:
            if self._last_hidden is None:
                raise ValueError("note_spans need the model's last_hidden_state (TupeBertForMaskedLM returns it)")
            self._update_notes(core, self._last_hidden, spans, inputs)
        self._last_hidden = None
        return loss

    def _update_notes(self, core, hidden, spans, inputs):
        group = None
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = torch.distributed.group.WORLD
        mask = inputs.get("attention_mask")
        lengths = mask.sum(1).to(hidden.device) if mask is not None else None  # right-padded rows
        kwargs = {}
        if inputs.get("position_ids") is not None and \
                "position_ids" in inspect.signature(core.update_notes).parameters:
            kwargs["position_ids"] = inputs["position_ids"].to(hidden.device)
        core.update_notes(hidden, spans.to(hidden.device), lengths, process_group=group, **kwargs)

    # ---------------------------------------------------------------------------------------------- logging

    def log(self, logs, start_time=None):
        if "loss" in logs and self._metric_count:  # a training log: add the means since the last one
            keys = sorted(self._metric_sums)
            if keys:
                device = self._metric_sums[keys[0]].device
                means = torch.stack([self._metric_sums[k] for k in keys]).to(device) / self._metric_count
                if self.args.world_size > 1:
                    means = self.accelerator.gather(means.reshape(1, -1)).mean(0)
                logs.update({k: float(v) for k, v in zip(keys, means.tolist())})
            self._metric_sums, self._metric_count = {}, 0
            notes = getattr(_unwrap(self.model), "notes", None)
            if notes is not None:
                logs["notes_taken"] = int((notes.counts > 0).sum())
        super().log(logs, start_time)
