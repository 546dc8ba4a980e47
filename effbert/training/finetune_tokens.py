"""``effbert finetune --task token-classification``: sequence labelling with token-level early exit
(Li et al., "Accelerating BERT Inference for Sequence Labeling via Early-Exit", ACL 2021; official
code LeeSureman/Sequence-Labeling-Early-Exit), top to bottom in ``run``: read the CoNLL files, load
the encoder with a token classifier after every layer, stage 1 (joint training of every layer's
classifier, PABEE's ``i + 1`` weights: the model's own loss) through ``transformers.Trainer``, then
with ``--self-sampling-steps`` stage 2 (self-sampling fine-tuning of the stage-1 model: simulated
exits drawn each step, the sandwich, flooding) as a second Trainer run; save the model, then the
report on --eval: every layer's entity F1 (seqeval) after each stage, TOKEE and SENTEE over
thresholds (F1, token-layers and layers saved, the speed-up of interleaved pairs), and with
``--target-exit`` the TOKEE threshold calibrated for that average exit layer.

Deliberate differences from the published stage 2 (docs/token_exit.md says why): Trainer's linear
warm-up and decay instead of its inverse-square warm-up of 3000 steps, one gradient-norm clip
(``--max-grad-norm``) instead of 1 for the encoder and 5 for the classifiers, weight decay on
matrices and embeddings only (``stage2_optimizer``), and a length in steps
(``--self-sampling-steps``) instead of 20 epochs: one Trainer configuration serves both stages.

``settings`` is the command's ``FinetuneSettings`` already checked (``commands.finetune.check``).
The run folder is the sequence task's (``training.finetune``): the same files, checkpoints in
``checkpoints/stage-1`` and ``checkpoints/stage-2``; ``load_finetuned`` loads the result.
"""

import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from .finetune import (
    CHECKPOINTS,
    PLOT_FILE,
    REPORT_FILE,
    check_same_train,
    loss_lines,
    setup,
    training_args,
)
from .run_folder import (
    UsageError,
    atomic_write,
    checkpoint_max_steps,
    fail_if,
    fingerprint,
    is_main_process,
    newest_complete,
    one_line,
    schedule_line,
    with_schedule,
)
from ..models.loading import CONFIG_FILE, SETTINGS_FILE, WEIGHT_FILES

TASK = "token-classification"
STAGE_FOLDERS = ("stage-1", "stage-2")
CALIBRATION_CANDIDATES = 25  # --target-exit's thresholds tried, 0.005 to 1 on a log scale
TIMING_ROUNDS = 3  # full-depth / early-exit pairs timed per threshold (as the sequence report)
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
# what finetune.json records of the settings (with the task, cased, max_len, the --train
# fingerprint, the stages' steps, the calibrated threshold and complete)
RECORDED = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "seed",
    "init",
    "hf",
    "train",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "weight_decay",
    "warmup_steps",
    "warmup_ratio",
    "self_sampling_steps",
    "self_sampling_learning_rate",
    "self_sampling_encoder_lr_scale",
    "no_flooding",
    "flooding_bias",
    "sandwich_small",
    "sandwich_full",
    "copy_wordpieces",
    "window",
)


def run(s, log):
    """The whole run; returns ``(model, report dict or None)``."""
    t0 = time.perf_counter()
    device = setup(s)
    # the sentences, their BIO labels checked (and, on a resume, the same --train as before)
    data = read_sentences(s)
    model, tokenizer, cased = load_token_model(s, data["labels"])
    max_len = min(s.max_seq_length, model.config.max_position_embeddings)
    training_args(s, os.path.join(s.out, CHECKPOINTS), device, 1)  # Trainer's refusals first
    train_rows = encode_rows(tokenizer, data, "train", max_len)
    eval_batches = None
    if data["eval_words"] is not None:
        eval_batches = batches_of(encode_rows(tokenizer, data, "eval", max_len), tokenizer, s)
    record = settings_record(s, cased, max_len)
    log = start_folder(s, record, data, model, device, log)
    model, losses, stage1_f1 = train_stages(
        s, model, tokenizer, train_rows, eval_batches, device, log
    )
    if not is_main_process():
        return model, None
    model = model.to(device).eval()
    calibrated = None
    if s.target_exit is not None:
        calibrated = calibrate(s, model, eval_batches, device, log)
    record = dict(
        record,
        steps=len(losses["stage-1"]) + len(losses["stage-2"]),
        stage_steps={k: len(v) for k, v in losses.items()},
        token_exit=calibrated,
        complete=True,
    )
    save(s, model, tokenizer, data["labels"], record, calibrated, log)
    report = None
    if eval_batches is not None:
        report = report_on_eval(s, model, eval_batches, losses, stage1_f1, calibrated, device, log)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return model, report


# -------------------------------------------------------------------------------------- the data


def read_sentences(s):
    """``{"labels", "train_words", "train_tags", "eval_words", "eval_tags"}`` of --train and --eval
    (``data.conll.read_conll``: BIO checked, errors naming the flag, the file and the line); the
    labels are --train's (``label_list``), --eval's must be among them."""
    from ..data.conll import label_list, read_conll

    try:
        words, tags = read_conll(s.train, "--train")
        if s.resume and is_main_process():
            check_same_train(s)
        labels = label_list(tags)
        fail_if(
            len(labels) < 2, f"--train: every word has the label {labels[0]!r}; tagging needs two"
        )
        data = dict(labels=labels, train_words=words, train_tags=tags)
        data["eval_words"] = data["eval_tags"] = None
        if s.eval is not None:
            data["eval_words"], data["eval_tags"] = read_conll(s.eval, "--eval")
            unknown = sorted({t for sent in data["eval_tags"] for t in sent} - set(labels))
            fail_if(unknown, f"--eval: labels {unknown[:5]} do not occur in --train")
    except (ValueError, TypeError) as exc:  # the reader's errors name the flag
        raise UsageError(one_line(exc)) from None
    return data


def encode_rows(tokenizer, data, part, max_len):
    """``encode_conll``'s rows of ``part`` ("train" or "eval"): labels on first word pieces."""
    from ..data.conll import encode_conll

    label2id = {name: i for i, name in enumerate(data["labels"])}
    return encode_conll(tokenizer, data[f"{part}_words"], data[f"{part}_tags"], label2id, max_len)


def batches_of(rows, tokenizer, s):
    """``rows`` collated in order, --per-device-eval-batch-size at a time (tensors on the CPU)."""
    from ..data.conll import token_classification_collator

    collate, size = token_classification_collator(tokenizer), s.per_device_eval_batch_size
    return [collate(rows[i : i + size]) for i in range(0, len(rows), size)]


# ----------------------------------------------------------------------------------- the model


def load_token_model(s, labels):
    """``(multi-exit TupeBertForTokenClassification in train mode, fast tokenizer, cased)`` from
    --hf (``token_classifier_from_hf_bert``) or --init (an effbert pretrain run: its weights, or
    its newest complete checkpoint's), ``id2label`` set from ``labels``. Errors are one line
    naming the flag."""
    try:
        if s.hf is not None:
            model, tokenizer = _from_hf(s, len(labels))
        else:
            model, tokenizer = _from_pretrain(s, len(labels))
    except (ValueError, OSError) as exc:
        raise UsageError(one_line(exc)) from None
    from ..models.loading import lowercases

    source = "--hf" if s.hf is not None else "--init"
    fail_if(
        len(tokenizer) > model.config.vocab_size,
        f"{source}: the tokenizer has {len(tokenizer)} pieces, more than the model's vocab_size "
        f"{model.config.vocab_size}",
    )
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.config.backend = s.backend
    model.set_backend(s.backend)
    return model.train(), tokenizer, not lowercases(tokenizer)


def _from_hf(s, num_labels):
    from ..integrations.hf import token_classifier_from_hf_bert
    from ..models.loading import hf_folder_tokenizer

    tokenizer = hf_folder_tokenizer(s.hf, s.cased)
    try:
        model = token_classifier_from_hf_bert(s.hf, num_labels, backend=s.backend)
    except (ValueError, OSError, ImportError, KeyError) as exc:
        raise ValueError(f"--hf: {' '.join(str(exc).split())[:400]}") from None
    return model.float(), tokenizer


def _from_pretrain(s, num_labels):
    from ..models.loading import multi_exit_from_pretrain_folder
    from ..models.token_classification import TupeBertForTokenClassification

    return multi_exit_from_pretrain_folder(
        TupeBertForTokenClassification, s.init, num_labels, s.backend, s.cased
    )


# ------------------------------------------------------------------------------ the run folder


def settings_record(s, cased, max_len):
    """The run's settings as ``finetune.json`` records them (``complete`` False until saved)."""
    record = {name: getattr(s, name) for name in RECORDED}
    record.update(
        task=TASK,
        cased=cased,
        max_len=max_len,
        train_data=fingerprint(s.train),
        complete=False,
    )
    return record


def start_folder(s, record, data, model, device, log):
    """As the sequence task: an overwritten run's checkpoints cleared, ``finetune.json``
    (incomplete) written, one line saying what runs; a silent log on the other processes."""
    import shutil

    if not is_main_process():
        return lambda msg: None
    if s.overwrite and not s.resume:
        shutil.rmtree(os.path.join(s.out, CHECKPOINTS), ignore_errors=True)
    os.makedirs(s.out, exist_ok=True)
    atomic_write(
        json.dumps(record, indent=2, sort_keys=True) + "\n", os.path.join(s.out, SETTINGS_FILE)
    )
    log(
        f"effbert finetune --task {TASK} on {device}: {len(data['train_words'])} training "
        f"sentences, labels {data['labels']}, {model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}"
    )
    return log


def save(s, model, tokenizer, labels, record, calibrated, log):
    """``save_finetuned`` into --out (the calibrated TOKEE threshold also in the config as
    ``token_exit``), and the line that says where."""
    from ..models.loading import save_finetuned

    model.config.token_exit = calibrated
    save_finetuned(s.out, model, tokenizer, labels, record)
    log(
        f"model saved to {os.path.abspath(s.out)} ({CONFIG_FILE}, {WEIGHT_FILES[0]}, "
        f"{SETTINGS_FILE}); load_finetuned or AutoModelForTokenClassification.from_pretrained "
        "loads it"
    )


# ---------------------------------------------------------------------------------- training


class SelfSamplingCollator:
    """Stage 2's batches: ``token_classification_collator`` on the rows' ``input_ids``,
    ``attention_mask`` and ``labels``, with each row's stage-1 outputs (``stage1_logits [L, n, C]``,
    ``stage1_loss [L, n]``) padded to the batch's width and stacked ``[L, B, N, C]``, ``[L, B,
    N]``."""

    def __init__(self, tokenizer):
        from ..data.conll import token_classification_collator

        self.base = token_classification_collator(tokenizer)

    def __call__(self, rows):
        batch = self.base([{k: r[k] for k in TOKEN_KEYS} for r in rows])
        n = batch["input_ids"].shape[1]
        batch["stage1_logits"] = torch.stack(
            [F.pad(r["stage1_logits"], (0, 0, 0, n - r["stage1_logits"].shape[1])) for r in rows],
            1,
        )
        batch["stage1_loss"] = torch.stack(
            [F.pad(r["stage1_loss"], (0, n - r["stage1_loss"].shape[1])) for r in rows], 1
        )
        return batch


def token_trainer_class():
    """``transformers.Trainer`` whose ``compute_loss`` adds, in stage 2, the self-sampling inputs
    of each micro-batch (``training.token_exit.self_sampling_inputs``: a fresh draw from a
    generator seeded by the run's seed, the optimizer step and the micro-batch within it, so that a
    resumed run draws what the uninterrupted one drew)."""
    from transformers import Trainer

    from .token_exit import self_sampling_inputs

    class TokenExitTrainer(Trainer):
        self_sampling = None  # stage 2: dict(seed, flooding, flooding_bias, copy_wordpieces, ...)
        _draw_at = (-1, 0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            plan = self.self_sampling
            if plan is not None:
                inputs = dict(inputs)
                logits, loss1 = inputs.pop("stage1_logits"), inputs.pop("stage1_loss")
                step = self.state.global_step
                micro = self._draw_at[1] + 1 if self._draw_at[0] == step else 0
                self._draw_at = (step, micro)
                seed = (plan["seed"] * 1_000_003 + step) * 1_009 + micro
                inputs.update(
                    self_sampling_inputs(
                        inputs,
                        logits,
                        None if plan["no_flooding"] else loss1,
                        flooding_bias=plan["flooding_bias"],
                        copy_wordpieces=plan["copy_wordpieces"],
                        sandwich_small=plan["sandwich_small"],
                        sandwich_full=plan["sandwich_full"],
                        generator=torch.Generator().manual_seed(seed),
                    )
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return TokenExitTrainer


def stage2_optimizer(s, model):
    """The published stage 2's AdamW (``V0/further_train.py``): the encoder at
    ``--self-sampling-learning-rate`` times ``--self-sampling-encoder-lr-scale``
    (``--ptm_lr_rate``),
    the classifiers at ``--self-sampling-learning-rate``; --weight-decay on the matrices and
    embeddings only, as stage 1 (Trainer's optimizer) has it (the published AdamW decays every
    weight)."""
    no_decay = {n for n, _ in model.named_parameters() if "norm" in n.lower() or "bias" in n}
    lr = s.self_sampling_learning_rate
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "encoder" if name.startswith("bert.") else "head"
        key = (part, name not in no_decay)
        groups.setdefault(key, []).append(p)
    return torch.optim.AdamW(
        [
            dict(
                params=ps,
                lr=lr * (s.self_sampling_encoder_lr_scale if part == "encoder" else 1.0),
                weight_decay=s.weight_decay if decay else 0.0,
            )
            for (part, decay), ps in sorted(groups.items())
        ],
        lr=lr,
        betas=(s.adam_beta1, s.adam_beta2),
        eps=s.adam_epsilon,
    )


def _stage_plan(s, stage):
    """The settings Trainer gets for ``stage``: stage 2 takes --self-sampling-steps and its
    learning rate."""
    if stage == 1:
        return s
    plan = copy.copy(s)
    plan.max_steps, plan.learning_rate = s.self_sampling_steps, s.self_sampling_learning_rate
    return plan


def train_stage(s, model, tokenizer, dataset, folder, device, stage, log):
    """One Trainer run into ``folder`` (resumed from its newest complete checkpoint with
    --resume); its per-step losses. A non-finite loss is a one-line ``UsageError``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .progress import LogOnlyBar

    plan = _stage_plan(s, stage)
    resume = newest_complete(folder, log) if s.resume else None
    kept = checkpoint_max_steps(resume) if resume is not None and not s.reshape_schedule else None
    lines = loss_lines(plan, log)
    kwargs = {}
    if stage == 1:
        from ..data.conll import token_classification_collator

        collate = token_classification_collator(tokenizer)
    else:
        collate = SelfSamplingCollator(tokenizer)
        kwargs["optimizers"] = (stage2_optimizer(s, model), None)
    args = training_args(plan, folder, device, stage)
    trainer = with_schedule(token_trainer_class(), kept)(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=[lines],
        **kwargs,
    )
    if stage == 2:
        trainer.self_sampling = dict(
            seed=s.seed,
            no_flooding=s.no_flooding,
            flooding_bias=s.flooding_bias,
            copy_wordpieces=s.copy_wordpieces,
            sandwich_small=s.sandwich_small,
            sandwich_full=s.sandwich_full,
        )
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LogOnlyBar())
    if trainer.is_world_process_zero():
        describe_stage(s, plan, trainer, stage, resume, kept, log)
    t0 = time.perf_counter()
    run_folder = getattr(s, "run_folder", None)
    if run_folder is not None:
        run_folder.checkpoint_root = folder
        run_folder.train(trainer, resume)
    else:
        trainer.train(resume_from_checkpoint=resume)
    if lines.bad is not None:
        bad, step = lines.bad
        flag = "--learning-rate" if stage == 1 else "--self-sampling-learning-rate"
        raise UsageError(f"the loss is {bad} at step {step} of stage {stage}: lower {flag}")
    if trainer.is_world_process_zero():
        log(f"stage {stage} trained in {time.perf_counter() - t0:.1f} s")
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def describe_stage(s, plan, trainer, stage, resume, kept, log):
    """The line that says what a stage trains, and the schedule kept on a resume."""
    count, per_epoch = len(trainer.train_dataset), len(trainer.get_train_dataloader())
    accum = s.gradient_accumulation_steps
    steps = plan.max_steps
    if steps is None:
        steps = max(1, math.ceil(s.num_train_epochs * per_epoch / accum))
    batch = s.per_device_train_batch_size * accum * trainer.args.world_size
    if stage == 1:
        what = "stage 1: every layer's classifier, the joint loss (weights i + 1)"
    else:
        what = (
            "stage 2: self-sampling, sandwich "
            f"{s.sandwich_small} + {s.sandwich_full}, "
            + ("no flooding" if s.no_flooding else f"flooding (bias {s.flooding_bias})")
            + f", learning rate {s.self_sampling_learning_rate} (encoder x "
            f"{s.self_sampling_encoder_lr_scale}: the step lines show the encoder's)"
        )
    log(
        f"{what}; {count} sentences, {steps} steps of {batch} ({steps * accum / per_epoch:.2f} "
        f"epochs), backend {s.backend}" + (f", resumed from {resume}" if resume else "")
    )
    if resume is not None:
        log(
            "  "
            + schedule_line(
                kept or checkpoint_max_steps(resume) or steps, steps, s.reshape_schedule
            )
        )


def stage1_rows(model, rows, tokenizer, s, device):
    """``rows`` with the stage-1 model's outputs on each (``token_exit.stage1_outputs``, eval mode,
    computed once before stage 2 as the published ``get_pred``): ``stage1_logits [L, n, C]`` and
    ``stage1_loss [L, n]`` float32 on the CPU, ``n`` the row's length."""
    from .token_exit import stage1_outputs

    out, size = [], s.per_device_eval_batch_size
    model = model.to(device)
    for start, batch in zip(range(0, len(rows), size), batches_of(rows, tokenizer, s)):
        on = {k: v.to(device) for k, v in batch.items()}
        logits, loss = stage1_outputs(model, on)
        for j, row in enumerate(rows[start : start + size]):
            n = len(row["input_ids"])
            out.append(
                dict(row, stage1_logits=logits[:, j, :n].cpu(), stage1_loss=loss[:, j, :n].cpu())
            )
    return out


def _finished_losses(folder):
    done = newest_complete(folder)
    if done is None:
        return []
    with open(os.path.join(done, "trainer_state.json"), encoding="utf-8") as f:
        return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]


def _load_checkpoint_weights(model, folder):
    """The weights of ``folder``'s newest complete checkpoint into ``model`` (the stage-1 model a
    resumed stage 2 draws from)."""
    from safetensors.torch import load_file

    done = newest_complete(folder)
    fail_if(
        done is None,
        f"--resume: {folder!r} holds no complete checkpoint of stage 1, which stage 2 draws from",
    )
    state = load_file(os.path.join(done, WEIGHT_FILES[0]))
    model.load_state_dict(state)


def train_stages(s, model, tokenizer, train_rows, eval_batches, device, log):
    """Stage 1 into ``checkpoints/stage-1``, then (``--self-sampling-steps``) stage 2 into
    ``checkpoints/stage-2`` from the stage-1 model. Returns ``(model, {"stage-1": losses,
    "stage-2": losses}, stage-1 per-layer F1 or None)``; the F1 is measured on --eval between the
    stages. A resume whose stage 2 has a checkpoint takes stage 1's weights from its last
    checkpoint."""
    root = os.path.join(s.out, CHECKPOINTS)
    first, second = (os.path.join(root, f) for f in STAGE_FOLDERS)
    losses = {"stage-1": [], "stage-2": []}
    if s.resume and s.self_sampling_steps and newest_complete(second) is not None:
        _load_checkpoint_weights(model, first)
        losses["stage-1"] = _finished_losses(first)
        log("stage 1 finished before the resume: its model from its last checkpoint")
    else:
        losses["stage-1"] = train_stage(s, model, tokenizer, train_rows, first, device, 1, log)
    stage1_f1 = None
    if eval_batches is not None and is_main_process():
        stage1_f1 = per_layer_f1(model, eval_batches, device)
        log("stage 1 entity F1 of each layer on --eval: " + _f1_text(stage1_f1))
    if s.self_sampling_steps:
        t0 = time.process_time()
        rows = stage1_rows(model, train_rows, tokenizer, s, device)
        log(f"stage-1 outputs on {len(rows)} sentences ({time.process_time() - t0:.1f} s CPU)")
        model.train()
        losses["stage-2"] = train_stage(s, model, tokenizer, rows, second, device, 2, log)
    for folder in (first, second, root):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # Trainer makes its output folder even when it keeps no checkpoint
    return model.eval(), losses, stage1_f1


# ------------------------------------------------------------------------------------ report


def _on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def eval_exit_logits(model, batches, device):
    """``(exit_logits [L, n, N, C], labels [n, N])`` of every layer's classifier over ``batches``
    (padded to the widest; -100 labels there)."""
    model.eval()
    logits, labels = [], []
    for b in batches:
        on = _on(b, device)
        logits.append(model(on["input_ids"], attention_mask=on["attention_mask"]).exit_logits)
        labels.append(b["labels"])
    n = max(x.shape[2] for x in logits)
    logits = torch.cat([F.pad(x.cpu().float(), (0, 0, 0, n - x.shape[2])) for x in logits], 1)
    labels = torch.cat([F.pad(y, (0, n - y.shape[1]), value=-100) for y in labels])
    return logits, labels


def per_layer_f1(model, batches, device):
    """Every layer's entity F1 (``token_metrics.per_layer_entity_f1``, seqeval) on ``batches``."""
    from ..token_metrics import per_layer_entity_f1

    logits, labels = eval_exit_logits(model, batches, device)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return per_layer_entity_f1(logits, labels, id2label)


def _f1_text(values):
    return " ".join(f"{v:.4f}" for v in values)


def _exit_pass(model, batches, device, mode, threshold, s):
    """One pass of ``early_exit_token_labels`` over ``batches``: ``(labels list, exit layers
    list, token-layers)``; ``threshold`` 0 runs every layer (no normalised entropy is below 0)."""
    from ..models.token_classification import published_token_thresholds

    depth = model.config.num_hidden_layers
    per_layer = (
        published_token_thresholds(threshold, depth) if mode == "tokee" else [threshold] * depth
    )
    preds, exits, used = [], [], 0
    for b in batches:
        on = _on(b, device)
        out = model.early_exit_token_labels(
            on["input_ids"],
            on["attention_mask"],
            label_mask=on["labels"] != -100,
            mode=mode,
            thresholds=per_layer,
            window=s.window,
            copy_wordpieces=s.copy_wordpieces,
        )
        preds.append(out.labels.cpu())
        exits.append(out.exit_layer.cpu())
        used += out.token_layers
    return preds, exits, used


def _f1_of(preds, batches, id2label):
    from ..token_metrics import label_sequences, require_seqeval

    metrics = require_seqeval()
    y_true, y_pred = [], []
    for p, b in zip(preds, batches):
        g = b["labels"]
        y_true += label_sequences(g.masked_fill(g == -100, 0), g, id2label)
        y_pred += label_sequences(p.masked_fill(g == -100, 0), g, id2label)
    return float(metrics.f1_score(y_true, y_pred, zero_division=0))


def exit_rows(s, model, batches, device):
    """The full-depth row, then TOKEE and SENTEE at each of --token-exit-thresholds: ``mode``,
    ``threshold``, ``f1`` (seqeval over the sentences), ``avg_exit_layer`` (over the words),
    ``layers_saved`` (``1 - avg_exit_layer / depth``), ``token_layers_saved`` (``1 - token-layers
    run / every real token through every layer``), ``speedup`` (``bench.timing.paired_speedup``:
    the median of interleaved full-depth / early-exit pairs, process CPU time on a CPU, wall time
    on a GPU), ``speedup_bound`` (the token-layers' bound, full / run), ``above_bound`` (the
    speed-up
    over 1.05 times the bound: timing noise), ``delta`` (F1 against full depth), ``seconds``."""
    from ..bench.timing import paired_speedup

    depth = model.config.num_hidden_layers
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    real = sum(int(b["attention_mask"].sum()) for b in batches) * depth
    _exit_pass(model, batches[:1], device, "tokee", 0.0, s)  # warm-up
    preds, exits, used = _exit_pass(model, batches, device, "tokee", 0.0, s)
    fail_if(used != real, "internal: the full-depth pass skipped token-layers")
    f1_full = _f1_of(preds, batches, id2label)
    rows = [
        dict(
            mode="full",
            threshold=None,
            f1=f1_full,
            avg_exit_layer=float(depth),
            layers_saved=0.0,
            token_layers_saved=0.0,
            speedup=1.0,
            speedup_bound=1.0,
            above_bound=False,
            delta=0.0,
            seconds=None,
        )
    ]
    for mode in ("tokee", "sentee"):
        for t in s.token_exit_thresholds:
            out = {}

            def early(mode=mode, t=t):
                out["run"] = _exit_pass(model, batches, device, mode, t, s)

            def full():
                _exit_pass(model, batches, device, "tokee", 0.0, s)

            speed, t_full = paired_speedup(full, early, device, TIMING_ROUNDS)
            preds, exits, used = out["run"]
            layers = torch.cat([e[b["labels"] != -100].double() for e, b in zip(exits, batches)])
            avg = float(layers.mean()) if layers.numel() else float(depth)
            f1 = _f1_of(preds, batches, id2label)
            bound = real / max(used, 1)
            rows.append(
                dict(
                    mode=mode,
                    threshold=t,
                    f1=f1,
                    avg_exit_layer=avg,
                    layers_saved=1 - avg / depth,
                    token_layers_saved=1 - used / real,
                    speedup=speed,
                    speedup_bound=bound,
                    above_bound=bool(speed > 1.05 * bound),
                    delta=f1 - f1_full,
                    seconds=t_full / speed,
                )
            )
            rows[0]["seconds"] = t_full
    return rows


def exit_lines(rows, device):
    """The early-exit table as lines, then how the speed-up was measured and the footnote of a
    row above its bound."""
    from ..calibration import NOISE_FOOTNOTE

    lines = [
        f"  {'mode':>6} {'threshold':>9} {'avg exit':>9} {'layers saved':>13} "
        f"{'tok-layers saved':>17} {'speed-up':>9} {'F1':>7} {'vs full':>8}"
    ]
    for r in rows:
        t = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(
            f"  {r['mode']:>6} {t:>9} {r['avg_exit_layer']:9.2f} {r['layers_saved']:12.1%} "
            f"{r['token_layers_saved']:16.1%} {r['speedup']:8.2f}x {r['f1']:7.4f} "
            f"{r['delta']:+8.4f}{'  *' if r['above_bound'] else ''}"
        )
    full_s = rows[0]["seconds"]
    lines.append(
        f"  (speed-up: {'wall' if device.type == 'cuda' else 'CPU'} time of the batched "
        f"full-depth pass over the early-exit pass, the median of {TIMING_ROUNDS} interleaved "
        "pairs" + (f"; {full_s:.2f} s full)" if full_s is not None else ")")
    )
    lines.append(
        "  (TOKEE: the threshold for the first half of the layers, twice it after, as published; "
        "SENTEE: the same at every layer; the bound of a speed-up is the token-layers')"
    )
    if any(r["above_bound"] for r in rows):
        lines.append("  " + NOISE_FOOTNOTE.replace("average exit layer", "token-layers run"))
    return lines


def calibrate(s, model, batches, device, log):
    """--target-exit: ``token_metrics.calibrate_token_threshold`` on --eval (the largest TOKEE
    threshold of ``CALIBRATION_CANDIDATES`` from 0.005 to 1 whose average exit layer is at least
    the target; the smallest when none is). Returns the record saved with the model: ``{"mode":
    "tokee", "threshold", "thresholds" (per layer), "window", "copy_wordpieces", "target_exit",
    "avg_exit_layer", "token_layers_saved", "reached"}``."""
    from ..models.token_classification import published_token_thresholds
    from ..token_metrics import calibrate_token_threshold

    depth = model.config.num_hidden_layers
    fail_if(
        s.target_exit > depth,
        f"--target-exit must be at most the model's {depth} layers, got {s.target_exit}",
    )
    on = [_on(b, device) for b in batches]
    # 0.005 to 1 on a log scale: a normalised entropy is at most 1, so 1 lets every word out at
    # layer 1 (the second half's doubled thresholds reach 1 from a base of 0.5)
    candidates = torch.logspace(math.log10(0.005), 0.0, CALIBRATION_CANDIDATES).tolist()
    point, curve = calibrate_token_threshold(
        model,
        on,
        s.target_exit,
        candidates=candidates,
        window=s.window,
        copy_wordpieces=s.copy_wordpieces,
    )
    reached = point.avg_exit_layer >= s.target_exit
    log(
        f"\nTOKEE threshold calibrated on --eval for an average exit of at least {s.target_exit}: "
        f"{point.threshold:.5g} (average exit {point.avg_exit_layer:.2f}, "
        f"{point.saved:.1%} of the token-layers saved)"
        + (
            ""
            if reached
            else f"; no candidate keeps the words that late, the smallest ({candidates[0]:g}) "
            "is taken"
        )
    )
    return dict(
        mode="tokee",
        threshold=point.threshold,
        thresholds=published_token_thresholds(point.threshold, depth),
        window=s.window,
        copy_wordpieces=s.copy_wordpieces,
        target_exit=s.target_exit,
        avg_exit_layer=point.avg_exit_layer,
        token_layers_saved=point.saved,
        reached=reached,
    )


def report_on_eval(s, model, batches, losses, stage1_f1, calibrated, device, log):
    """The report on --eval: every layer's entity F1 (after stage 1 and, with stage 2, after it),
    the early-exit table (``exit_rows``), the calibrated threshold; written to ``report.json``
    with the losses, and its plot."""
    from ..calibration_plot import plot_run

    depth = model.config.num_hidden_layers
    final_f1 = per_layer_f1(model, batches, device) if s.self_sampling_steps else stage1_f1
    n = sum(b["input_ids"].shape[0] for b in batches)
    log(f"\nentity F1 (seqeval) of each layer's classifier on {n} --eval sentences:")
    log("  " + " ".join(f"{'layer ' + str(i + 1):>8}" for i in range(depth)))
    log("  " + " ".join(f"{v:8.4f}" for v in stage1_f1) + "  stage 1")
    if s.self_sampling_steps:
        log("  " + " ".join(f"{v:8.4f}" for v in final_f1) + "  stage 2")
    rows = exit_rows(s, model, batches, device)
    log(f"\nbatched early exit on {n} --eval sentences ({depth} layers, window {s.window}):")
    for line in exit_lines(rows, device):
        log(line)
    every = losses["stage-1"] + losses["stage-2"]
    report = {
        "task": TASK,
        "labels": [model.config.id2label[i] for i in range(model.config.num_labels)],
        "num_layers": depth,
        "num_examples": n,
        "device": str(device),
        "window": s.window,
        "per_layer_f1": {
            "stage-1": stage1_f1,
            "stage-2": final_f1 if s.self_sampling_steps else None,
        },
        "final_per_layer_f1": final_f1,
        "full_depth_f1": rows[0]["f1"],
        "rows": rows,
        "token_exit": calibrated,
        "stage_steps": {k: len(v) for k, v in losses.items()},
        "train_steps": len(every),
        "losses": every,
    }
    atomic_write(json.dumps(report, indent=2) + "\n", os.path.join(s.out, REPORT_FILE))
    log(f"\nreport: {os.path.abspath(os.path.join(s.out, REPORT_FILE))}")
    path = os.path.abspath(os.path.join(s.out, PLOT_FILE))
    drawn = plot_run(
        path,
        every,
        points=[(r["speedup"], r["f1"]) for r in rows if r["mode"] == "tokee"],
        full_accuracy=rows[0]["f1"],
        depth=depth,
        criterion=f"TOKEE, window {s.window}",
        metric="entity F1",
        loss_title="Stage 1" + (" then stage 2" if s.self_sampling_steps else ""),
    )
    log(
        f"plot (loss, speed-F1 of TOKEE): {path}"
        if drawn
        else "matplotlib is not installed: no plot written (pip install matplotlib)"
    )
    return report
