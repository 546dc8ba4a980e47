"""Multi-exit fine-tuning as ``effbert finetune`` runs it, top to bottom in ``run``: read the
labelled examples, load the encoder with an off-ramp after every layer, train through
``transformers.Trainer`` with the early-exit loss (``MultiExitTrainer``: RomeBERT's
self-distillation, PABEE's layer-weighted loss or DeeBERT's two stages), save the model, then
measure batched early exit over a range of thresholds (``effbert.calibration``).

``settings`` is the command's ``FinetuneSettings`` already checked
(``effbert.commands.finetune.check``): the per-device batch, the warm-up, the backend and
``progress`` settled. Each step is a function a test can call.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from .run_folder import (
    RunFolder,
    UsageError,
    atomic_write,
    check_same_data,
    checkpoint_max_steps,
    fail_if,
    fingerprint,
    is_main_process,
    newest_complete,
    one_line,
    schedule_line,
    with_schedule,
)
from ..models.loading import (
    CONFIG_FILE,
    SETTINGS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    VOCAB_FILE,
    WEIGHT_FILES,
)

REPORT_FILE, PLOT_FILE = "report.json", "report.png"
EARLY_BIRD_FILE = "early_bird.json"  # --early-bird: the search's stop, the ticket, the distances
CHECKPOINTS = "checkpoints"  # Trainer's checkpoint-N folders (--save-steps), under --out
# the files a finetune run writes: another run's (or anything's) are never overwritten
OUT_FILES = (
    CONFIG_FILE,
    SETTINGS_FILE,
    REPORT_FILE,
    PLOT_FILE,
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    CHECKPOINTS,
    VOCAB_FILE,
    EARLY_BIRD_FILE,
) + WEIGHT_FILES
WRITES = OUT_FILES + ("special_tokens_map.json",)


@dataclass
class Examples:
    """The labelled examples: class names (sorted; ``["value"]`` for regression), then texts and
    targets (int64 class ids, or float32 numbers) of --train and of --eval (None without it)."""

    labels: list
    train_texts: list
    train_targets: torch.Tensor
    eval_texts: list = None
    eval_targets: torch.Tensor = None


def run(s, log):
    """The whole run; returns ``(model, report dict or None)``. ``--task token-classification``
    is ``training.finetune_tokens.run``."""
    if getattr(s, "task", None) == "token-classification":
        from .finetune_tokens import run as run_tokens

        return run_tokens(s, log)
    t0 = time.perf_counter()
    # where it runs: the device, and the libraries' progress bars only for a person watching
    device = setup(s)
    # the examples, their labels checked (and, on a resume, the same --train as before)
    data = read_examples(s)
    # the encoder from --init or --hf, with an off-ramp after every layer
    model, tokenizer, cased = load_model(s, len(data.labels))
    max_len = min(s.max_seq_length, model.config.max_position_embeddings)
    # the --ensemble runs hold this run's labels and tokenizer (their weights load at the report)
    check_ensemble(s, data.labels, tokenizer, max_len)
    # Trainer's settings, so that its refusals (e.g. --fp16 on a CPU) come before any work
    training_args(s, os.path.join(s.out, CHECKPOINTS), device, 1)
    # the training examples, tokenized
    train_ds = to_dataset_of(tokenizer, data, max_len)
    # the settings, written first so that an interrupted run's folder is known as this command's
    record = settings_record(s, cased, max_len)
    log = start_folder(s, record, data, model, device, log)
    # training (DeeBERT: two stages), every process leaving the group at its end
    model, losses = train_in_group(s, model, tokenizer, train_ds, device, log)
    if not is_main_process():
        return model, None
    # the model, its tokenizer and finetune.json (last: a folder with it is complete)
    record = dict(record, steps=len(losses), complete=True)
    save(s, model.to(device), tokenizer, data.labels, record, log)
    # the early-exit report on --eval
    report = None
    if data.eval_texts is not None:
        report = report_on_eval(s, model, tokenizer, data, max_len, losses, device, log)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return model, report


# ----------------------------------------------------------------------------------- the run folder


def open_run_folder(s):
    """Lock ``--out`` (a ``RunFolder``) before any work, refusing the model's own folder and
    anything this run would overwrite: a pretraining run, an earlier fine-tuning run without
    --overwrite, foreign files. None on a process other than the first under torchrun (the first
    checks, and later writes, --out)."""
    if not is_main_process():
        return None
    source = s.init if s.init is not None else s.hf
    if (
        source is not None
        and os.path.isdir(source)
        and os.path.isdir(s.out)
        and os.path.samefile(source, s.out)
    ):
        raise UsageError(
            f"--out {s.out!r} is the folder of {'--init' if s.init else '--hf'}: "
            "fine-tuning would overwrite the model it starts from; choose another "
            "--out"
        )
    root = os.path.join(s.out, CHECKPOINTS)
    folder = RunFolder(s.out, "effbert finetune", WRITES, checkpoint_root=root)
    if not os.path.isdir(s.out):
        fail_if(s.resume, f"--resume: {s.out!r} does not exist: there is no run to resume")
        return folder.lock()  # released at once if the run stops before writing
    folder.lock()
    try:
        _check_folder_contents(s, folder)
    except UsageError:
        folder.release()
        raise
    return folder


def _check_folder_contents(s, folder):
    """What an existing --out may hold: nothing of anything else's, a finetune run only with
    --overwrite or --resume (which needs a checkpoint)."""
    held = [n for n in OUT_FILES + ("pretrain.json",) if os.path.exists(os.path.join(s.out, n))]
    if not held:
        fail_if(s.resume, f"--resume: {s.out!r} holds no effbert finetune run")
        folder.refuse_foreign()  # new or empty, as the docs say: the user's own files stay theirs
        return
    fail_if(
        os.path.exists(os.path.join(s.out, "pretrain.json")),
        f"--out: {s.out!r} holds an effbert pretrain run; choose another folder",
    )
    fail_if(
        not os.path.isfile(os.path.join(s.out, SETTINGS_FILE)),
        f"--out: {s.out!r} holds {', '.join(held)} of something else; choose another folder",
    )
    folder.refuse_foreign()
    root = os.path.join(s.out, CHECKPOINTS)
    if s.resume:
        fail_if(
            not any(newest_complete(d) for d in (root, os.path.join(root, "stage-1"))),
            f"--resume: {s.out!r} holds no checkpoint (--save-steps keeps them)",
        )
        return
    fail_if(
        not s.overwrite,
        f"--out: {s.out!r} holds an earlier effbert finetune run; pass "
        "--overwrite to replace it (or --resume to continue it) or choose another folder",
    )


# --------------------------------------------------------------------------------- the steps of run


def setup(s):
    """The training device (made current on CUDA, as Trainer trains there) and the seed; the
    libraries' own progress bars off unless ``s.progress``. A missing library is a one-line
    ``UsageError`` that says how to install it."""

    default = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(s.device or default)
    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)
    try:
        from ..integrations.hf import require_transformers

        transformers = require_transformers()
        import datasets
    # regular dependencies, but an install can lack them: the message says how
    except ImportError as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    if not getattr(s, "progress", False):
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(s.seed)
    return device


def _warn(msg):
    print(f"effbert finetune: warning: {msg}", file=sys.stderr, flush=True)


def read_examples(s):
    """``Examples`` of --train and --eval: labels checked (a swapped or headed file refused,
    --eval's labels among --train's), or numbers with --regression; on a resume, --train must be the
    file the run started with."""
    from ..data.tsv import check_labels, label_numbers, read_tsv

    try:
        names, texts = read_tsv(s.train, "--train")
        if s.resume and is_main_process():
            check_same_train(s)
        if s.regression:  # numeric labels: no classes to check
            labels, targets = ["value"], label_numbers(names, "--train")
        else:
            check_labels(names, texts, s.train, "--train", warn=_warn)
            labels = sorted(set(names))
            fail_if(
                len(labels) < 2,
                f"--train: every example has the label {labels[0]!r}; classification needs two",
            )
            index = {name: i for i, name in enumerate(labels)}
            targets = torch.tensor([index[n] for n in names], dtype=torch.int64)
        data = Examples(labels, texts, targets)
        if s.eval is not None:
            e_names, data.eval_texts = read_tsv(s.eval, "--eval")
            unknown = [] if s.regression else sorted(set(e_names) - set(labels))
            fail_if(unknown, f"--eval: labels {unknown[:5]} do not occur in --train")
            data.eval_targets = (
                label_numbers(e_names, "--eval")
                if s.regression
                else torch.tensor([labels.index(n) for n in e_names], dtype=torch.int64)
            )
    except (ValueError, TypeError) as exc:  # the data module's errors name the flag
        raise UsageError(one_line(exc)) from None
    return data


def check_same_train(s):
    """--resume on the --train file the run started with (a run of an older version recorded
    none)."""
    path = os.path.join(s.out, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f).get("train_data")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        why = one_line(exc, 200)
        raise UsageError(
            f"--resume: cannot read {path!r} ({why}); the run folder is damaged"
        ) from None
    check_same_data("--train", None if recorded is None else [recorded], [s.train], s.out)


def load_model(s, num_labels):
    """``(multi-exit classifier on s.backend, tokenizer, cased)`` from --hf or --init (a pretraining
    run stopped early: its newest complete checkpoint); a tokenizer larger than the embeddings is
    refused."""
    from ..models.loading import from_hf_folder, from_pretrain_folder

    load = from_hf_folder if s.hf is not None else from_pretrain_folder
    try:
        model, tokenizer, cased = load(
            s.hf or s.init, num_labels, s.backend, s.cased, s.shared_pooler
        )
    except (ValueError, OSError) as exc:  # the loaders' errors name the flag
        raise UsageError(one_line(exc)) from None
    source = "--hf" if s.hf is not None else "--init"
    fail_if(
        len(tokenizer) > model.config.vocab_size,
        f"{source}: the tokenizer has "
        f"{len(tokenizer)} pieces, more than the model's vocab_size {model.config.vocab_size}",
    )
    model.set_backend(s.backend)
    return model, tokenizer, cased


def check_ensemble(s, labels, tokenizer, max_len):
    """--ensemble's run folders hold ``labels``, ``tokenizer``, ``max_len`` and the head kind of
    this run (``models.ensemble.check_runs_match``), else a one-line ``UsageError`` naming
    --ensemble."""
    from ..models.ensemble import check_runs_match

    if not getattr(s, "ensemble", None):
        return
    try:
        check_runs_match(s.ensemble, labels, tokenizer, max_len, s.regression)
    except (ValueError, OSError) as exc:
        raise UsageError("--ensemble: " + one_line(exc).removeprefix("paths: ")) from None


def adversarial_config(s):
    """The ``AdversarialConfig`` of --adversarial and its --adv-* flags, or None without
    --adversarial. Raises ``ValueError`` naming the config's field for a value out of range."""
    from .adversarial import AdversarialConfig

    if s.adversarial is None:
        return None
    return AdversarialConfig(
        s.adversarial,
        epsilon=s.adv_epsilon,
        alpha=s.adv_alpha,
        steps=s.adv_steps,
        adv_lr=s.adv_lr,
        adv_init_mag=s.adv_init_mag,
        adv_max_norm=s.adv_max_norm,
        norm_type=s.adv_norm_type,
        keep_clean=not s.adv_no_clean,
    )


def to_dataset_of(tokenizer, data, max_len):
    """The training examples as a tokenized ``datasets.Dataset``."""
    from ..data.tsv import to_dataset

    return to_dataset(tokenizer, data.train_texts, data.train_targets, max_len)


# what finetune.json records of the settings (with cased, max_len, the --train fingerprint, steps,
# complete)
RECORDED = (
    "loss",
    "gamma",
    "temperature",
    "grad_reg",
    "project",
    "ge",
    "shared_pooler",
    "regression",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "seed",
    "init",
    "hf",
    "train",
    "recipe",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "weight_decay",
    "warmup_steps",
    "warmup_ratio",
    "early_bird",
)


def settings_record(s, cased, max_len):
    """The run's settings as ``finetune.json`` records them (``complete`` False until the model is
    saved)."""
    record = {name: getattr(s, name) for name in RECORDED}
    config = adversarial_config(s)
    # the adversarial method and its settings (DeeBERT: stage 1 only), the ensemble's runs
    record.update(
        adversarial=None if config is None else dataclasses.asdict(config), ensemble=s.ensemble
    )
    # what a resume checks it is given again (run_folder.fingerprint: size and the ends' SHA-256)
    record.update(cased=cased, max_len=max_len, train_data=fingerprint(s.train), complete=False)
    return record


def start_folder(s, record, data, model, device, log):
    """On the first process: clear an overwritten run's checkpoints, write ``finetune.json``
    (incomplete) and say what runs. Returns the log to use: silent on the other processes under
    torchrun."""
    if not is_main_process():
        return lambda msg: None
    # the earlier run's checkpoints (--out holds a finetune run: checked)
    if s.overwrite and not s.resume:
        shutil.rmtree(os.path.join(s.out, CHECKPOINTS), ignore_errors=True)
        if os.path.isfile(os.path.join(s.out, EARLY_BIRD_FILE)):
            os.remove(os.path.join(s.out, EARLY_BIRD_FILE))
    os.makedirs(s.out, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write(text, os.path.join(s.out, SETTINGS_FILE))
    labels = "a regression head" if s.regression else f"labels {data.labels}"
    log(
        f"effbert finetune on {device}: {len(data.train_texts)} training examples, {labels}, "
        f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}"
    )
    return log


def train_in_group(s, model, tokenizer, train_ds, device, log):
    """``train``, then every process leaves the process group (as pretrain does: a process that
    exited with its group alive while the first still saved and evaluated aborted at its shutdown
    under torchrun)."""

    def distributed():
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    try:
        model, losses = train(s, model, tokenizer, train_ds, device, log)
        if distributed():
            torch.distributed.barrier()  # every process is here before any leaves the group
    finally:
        if distributed():
            torch.distributed.destroy_process_group()
    return model, losses


def save(s, model, tokenizer, labels, record, log):
    """``save_finetuned`` into --out, and the line that says where."""
    from ..models.loading import save_finetuned

    save_finetuned(s.out, model, tokenizer, labels, record)
    log(
        f"model saved to {os.path.abspath(s.out)} ({CONFIG_FILE}, {WEIGHT_FILES[0]}, "
        f"{TOKENIZER_FILE}, {SETTINGS_FILE}); AutoModelForSequenceClassification.from_pretrained "
        "loads it"
    )


# ----------------------------------------------------------------------------------------- training


def loss_lines(s, log):
    """The summary line every --logging-steps steps and the stop on a non-finite loss, as a
    ``TrainerCallback`` (Trainer logs every step: its log history holds each step's loss, also
    across a resume)."""
    from transformers import TrainerCallback

    from .progress import make_checkpoint_readable

    class Lines(TrainerCallback):
        bad = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                self.bad = (logs["loss"], state.global_step)
                control.should_training_stop = True
                control.should_save = False  # a non-finite model is never checkpointed
                return
            step, every = state.global_step, s.logging_steps
            if state.is_world_process_zero and (step % every == 0 or step == state.max_steps):
                recent = [h["loss"] for h in state.log_history if "loss" in h][-every:]
                log(
                    f"  step {step:6d}  loss {sum(recent) / len(recent):.4f}  lr "
                    f"{logs.get('learning_rate', 0):.2e}"
                )

        def on_save(self, args, state, control, **kwargs):
            make_checkpoint_readable(args, state)

    return Lines()


def training_args(s, output_dir, device, stage):
    """``TrainingArguments`` of one stage (a one-line ``UsageError`` where Trainer refuses them)."""
    import dataclasses

    from transformers import TrainingArguments

    save = s.save_steps > 0
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if s.warmup_steps is not None:
        warmup = {"warmup_steps": s.warmup_steps}
    # transformers 5 takes the warm-up share as a float warmup_steps; transformers 4 as warmup_ratio
    else:
        warmup = {"warmup_ratio" if "warmup_ratio" in names else "warmup_steps": s.warmup_ratio}
    try:
        return TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=s.per_device_train_batch_size,
            gradient_accumulation_steps=s.gradient_accumulation_steps,
            learning_rate=s.learning_rate,
            weight_decay=s.weight_decay,
            lr_scheduler_type="linear",
            max_grad_norm=s.max_grad_norm,
            **warmup,
            adam_beta1=s.adam_beta1,
            adam_beta2=s.adam_beta2,
            adam_epsilon=s.adam_epsilon,
            num_train_epochs=s.num_train_epochs,
            max_steps=s.max_steps if s.max_steps is not None else -1,
            seed=s.seed + stage - 1,
            data_seed=s.seed + stage - 1,
            fp16=s.fp16,
            bf16=s.bf16,
            use_cpu=device.type == "cpu",
            logging_strategy="steps",
            logging_steps=1,
            logging_nan_inf_filter=False,  # a NaN loss must reach the log, which stops the run
            save_strategy="steps" if save else "no",
            save_steps=s.save_steps if save else 500,
            save_total_limit=s.save_total_limit,
            report_to=s.report_to or "none",
            disable_tqdm=not getattr(s, "progress", False),
            remove_unused_columns=False,
            dataloader_drop_last=False,
            # DeeBERT's stage 1 leaves the lower off-ramps without a gradient; the other losses use
            # every weight
            ddp_find_unused_parameters=s.loss == "deebert",
        )
    # e.g. --fp16 without a GPU: TrainingArguments says why
    except (ValueError, ImportError) as exc:
        raise UsageError(one_line(exc)) from None


def make_trainer(s, model, tokenizer, train_ds, folder, device, stage, resume, lines):
    """The stage's ``MultiExitTrainer`` (keeping the run's schedule on a resume unless reshaped),
    with the quiet progress bar and without Trainer's per-log dict lines."""
    from transformers import DataCollatorWithPadding
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from . import MultiExitTrainer
    from .adversarial import with_adversarial
    from .progress import LogOnlyBar

    kept = checkpoint_max_steps(resume) if resume is not None and not s.reshape_schedule else None
    # DeeBERT's stage 2 trains the off-ramps over a frozen backbone: adversarial in stage 1 only
    adversarial = adversarial_config(s) if stage == 1 else None
    trainer = with_schedule(with_adversarial(MultiExitTrainer), kept)(
        model=model,
        args=training_args(s, folder, device, stage),
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=[lines],
        loss=s.loss,
        gamma=s.gamma,
        temperature=s.temperature,
        gradient_equilibrium=s.ge,
        stage=stage,
        grad_reg=s.grad_reg,
        project=s.project,
        adversarial=adversarial,
    )
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LogOnlyBar())  # the summary lines say the loss
    return trainer, kept


def describe_stage(s, trainer, model, stage, resume, kept, log):
    """The line that says what a stage trains (steps, batch, epochs, loss), and the schedule kept on
    a resume."""
    count, per_epoch = len(trainer.train_dataset), len(trainer.get_train_dataloader())
    accum = s.gradient_accumulation_steps
    steps = s.max_steps
    if steps is None:
        steps = max(1, math.ceil(s.num_train_epochs * per_epoch / accum))
    what = {
        "romebert": f"romebert (gamma {s.gamma}, temperature {s.temperature}"
        + (f", gradient projection of the {s.project} side" if s.grad_reg else "")
        + ")",
        "pabee": "pabee",
        "deebert": f"deebert stage {stage}",
    }[s.loss]
    if s.regression and s.loss == "romebert":
        what = "pabee's mean squared error (a regression head)"
    head = "a regression head" if s.regression else f"{model.config.num_labels} labels"
    # examples an optimizer step
    batch = s.per_device_train_batch_size * accum * trainer.args.world_size
    log(
        f"fine-tuning {model.config.num_hidden_layers} off-ramps, {head}, {count} examples: "
        f"{steps} steps of {batch} ({steps * accum / per_epoch:.2f} epochs), loss {what}"
        + (", gradient equilibrium" if s.ge else "")
        + adversarial_words(s, stage)
        + f", backend {s.backend}"
        + (f", resumed from {resume}" if resume else "")
    )
    if resume is not None:
        log(
            "  "
            + schedule_line(
                kept or checkpoint_max_steps(resume) or steps, steps, s.reshape_schedule
            )
        )


def adversarial_words(s, stage):
    """What the start-of-training line says of --adversarial: the method and its settings, or
    that DeeBERT's stage 2 trains without it ("" without --adversarial)."""
    config = adversarial_config(s)
    if config is None:
        return ""
    if stage != 1:
        return ", no adversarial training (--adversarial applies to DeeBERT's stage 1 only)"
    if config.method == "fgm":
        what = f"epsilon {config.epsilon}"
    elif config.method == "pgd":
        what = f"epsilon {config.epsilon}, alpha {config.alpha}, {config.steps} steps"
    else:
        what = (
            f"{config.steps} steps, adv-lr {config.adv_lr}, init {config.adv_init_mag}, "
            f"max norm {config.adv_max_norm} ({config.norm_type})"
            + ("" if config.keep_clean else ", no clean pass")
        )
    stage1 = " in DeeBERT's stage 1 only" if s.loss == "deebert" else ""
    return f", adversarial {config.method} ({what}){stage1}"


def train_stage(s, model, tokenizer, train_ds, folder, device, stage, log):
    """One Trainer run into ``folder`` (resumed from its newest complete checkpoint with --resume);
    its per-step losses. A non-finite loss is a one-line ``UsageError``."""
    resume = newest_complete(folder, log) if s.resume else None
    lines = loss_lines(s, log)
    trainer, kept = make_trainer(
        s, model, tokenizer, train_ds, folder, device, stage, resume, lines
    )
    if trainer.is_world_process_zero():
        describe_stage(s, trainer, model, stage, resume, kept, log)
    t0 = time.perf_counter()
    run_folder = getattr(s, "run_folder", None)  # held by the first process
    if run_folder is not None:
        run_folder.checkpoint_root = folder  # a stop names this stage's intact checkpoint
        # a full disk during a save: one line naming the intact checkpoint
        run_folder.train(trainer, resume)
    else:
        trainer.train(resume_from_checkpoint=resume)
    if lines.bad is not None:
        bad, step = lines.bad
        raise UsageError(f"the loss is {bad} at step {step}: lower --learning-rate")
    if s.grad_reg and trainer.is_world_process_zero():
        n = 0 if trainer.projected is None else int(trainer.projected)
        log(
            f"gradient regularization: the {s.project} side projected on {n} of "
            f"{trainer.state.global_step} steps" + (" (since the resume)" if resume else "")
        )
    if trainer.is_world_process_zero():
        log(f"trained in {time.perf_counter() - t0:.1f} s")
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _finished_stage_losses(folder):
    """The per-step losses of a DeeBERT stage that ended before a resume, from its last
    checkpoint."""
    done = newest_complete(folder)
    if done is None:
        return []
    with open(os.path.join(done, "trainer_state.json"), encoding="utf-8") as f:
        return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]


def prune_for_resume(s, model, root):
    """With --resume, ``model`` pruned to the ticket of the newest checkpoint's config (any
    stage's), so the Trainer loads the pruned weights into it; True when it was."""
    from .early_bird import prune_like_checkpoint

    if not s.resume:
        return False
    found = [
        newest_complete(d)
        for d in (os.path.join(root, "stage-2"), os.path.join(root, "stage-1"), root)
    ]
    ckpt = next((c for c in found if c is not None), None)
    if ckpt is None:
        return False
    try:
        pruned = prune_like_checkpoint(model, ckpt) is not None
    except ValueError as exc:
        raise UsageError(f"--resume: {one_line(exc, 300)}") from None
    fail_if(
        s.early_bird and not pruned,
        f"--resume --early-bird: {ckpt!r} holds an unpruned "
        "model (the run did not use --early-bird)",
    )
    return pruned


def early_bird_search(s, model, tokenizer, train_ds, root, device, log):
    """EarlyBERT's search (``effbert.training.early_bird.search``) with the run's
    ``MultiExitTrainer`` and loss: no checkpoints, ``--early-bird-search-steps`` steps (0: one
    epoch); then ``model`` is pruned to the ticket from its pre-search weights. Logs one line and
    writes ``early_bird.json``."""
    import copy

    from .early_bird import search, search_line, start_line

    plan = copy.copy(s)  # the run's settings, for the search's Trainer
    plan.max_steps = s.early_bird_search_steps or None
    plan.num_train_epochs, plan.save_steps, plan.report_to, plan.resume = 1.0, 0, None, False
    lines = loss_lines(plan, lambda msg: None)
    log(start_line(plan.max_steps, s.early_bird_l1, s.early_bird_draw_every))

    def make(bird):
        trainer, _ = make_trainer(plan, model, tokenizer, train_ds, root, device, 1, None, lines)
        trainer.add_callback(bird)
        return trainer

    try:
        result = search(
            model,
            make,
            head_l1=s.early_bird_l1,
            ffn_l1=s.early_bird_l1,
            draw_every=s.early_bird_draw_every,
            threshold=s.early_bird_threshold,
            patience=s.early_bird_patience,
            head_ratio=s.early_bird_head_ratio,
            ffn_ratio=s.early_bird_ffn_ratio,
        )
    except ValueError as exc:  # e.g. a ticket that leaves a layer no head
        raise UsageError(f"--early-bird: {one_line(exc, 300)}") from None
    if lines.bad is not None:
        bad, step = lines.bad
        raise UsageError(
            f"the loss is {bad} at step {step} of the EarlyBERT search: lower --learning-rate"
        )
    log(search_line(result))
    if is_main_process():
        atomic_write(json.dumps(result, indent=2) + "\n", os.path.join(s.out, EARLY_BIRD_FILE))
    return result


def train(s, model, tokenizer, train_ds, device, log):
    """Fine-tunes ``model`` in place; DeeBERT's loss runs its two stages, --max-steps (or epochs)
    each, into ``checkpoints/stage-N``. Returns ``(model in eval mode, every optimizer step's
    loss)``."""
    root = os.path.join(s.out, CHECKPOINTS)
    losses = []
    # --early-bird: a resume finds the pruned shapes in its checkpoint's config; else the search
    # (once, before DeeBERT's first stage) prunes the model the stages train
    if not prune_for_resume(s, model, root) and s.early_bird:
        fail_if(
            getattr(model.config, "early_bird_ticket", None),
            f"--early-bird: the model of "
            f"{'--init' if s.init else '--hf'} is pruned already (an EarlyBERT ticket); "
            "fine-tune it without --early-bird",
        )
        if s.loss == "deebert":
            model.set_deebert_stage(1)
        early_bird_search(s, model, tokenizer, train_ds, root, device, log)
    for stage in [1, 2] if s.loss == "deebert" else [1]:
        folder = root if s.loss != "deebert" else os.path.join(root, f"stage-{stage}")
        if s.loss == "deebert":
            model.set_deebert_stage(stage)
            log(
                "DeeBERT stage 1: the backbone and the final classifier on the last exit's loss"
                if stage == 1
                else "DeeBERT stage 2: backbone and final classifier frozen, the off-ramps on the sum "
                "of their losses"
            )
            later = newest_complete(os.path.join(root, "stage-2"))
            if stage == 1 and s.resume and later is not None:
                losses += _finished_stage_losses(folder)
                log("  (stage 1 finished before the resume)")
                continue
        losses += train_stage(s, model, tokenizer, train_ds, folder, device, stage, log)
    if s.loss == "deebert":
        model.set_deebert_stage(1)  # unfrozen again for whoever trains it next
    for folder in (os.path.join(root, "stage-1"), os.path.join(root, "stage-2"), root):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # Trainer makes its output folder even when it keeps no checkpoint
    return model.eval(), losses


# ------------------------------------------------------------------------------------------- report


def evaluate(s, model, input_ids, lengths, y, device, log):
    """Every exit's score, then the batched early exit measured at each threshold of --criterion
    (``calibration.early_exit_rows``), printed and returned as the report dict. With --regression
    the scores are mean squared errors (lower is better)."""
    from .. import calibration as cal

    depth, batch, y = model.config.num_hidden_layers, s.per_device_eval_batch_size, y.to(device)
    metric = "mse" if s.regression else "accuracy"
    exits = cal.every_exit_logits(model, input_ids, lengths, batch, device)
    per_exit = [cal.score(exits[i], y, s.regression) for i in range(depth)]
    log(f"\nevery exit on {input_ids.shape[0]} eval examples ({metric}):")
    log("  " + " ".join(f"{'exit ' + str(i + 1):>8}" for i in range(depth)))
    log("  " + " ".join(f"{v:8.4f}" for v in per_exit))
    # full depth through the same batched loop: patience 0 is PABEE's full-depth row
    full = dict(
        criterion="patience",
        patience=0,
        **({"threshold": s.regression_delta} if s.regression else {}),
    )
    rows = cal.early_exit_rows(
        model,
        input_ids,
        lengths,
        y,
        device,
        criterion=s.criterion,
        thresholds=cal.threshold_candidates(exits, s.criterion),
        batch=batch,
        full=full,
        regression_delta=s.regression_delta if s.regression else None,
    )
    curve = None
    if depth > 1 and not s.regression:
        curve = cal.speed_accuracy_curve(exits, y, criterion=s.criterion)
    log(
        f"\nbatched early exit on {input_ids.shape[0]} eval examples ({s.criterion}, {depth} "
        f"layers, batches of {batch}):"
    )
    for line in cal.report_lines(rows, criterion=s.criterion, metric=metric, device=device):
        log(line)
    warning = None if s.regression else cal.chance_warning(exits, y)
    if warning:
        log("  " + warning)
    ensemble = None
    if getattr(s, "ensemble", None):
        ensemble = ensemble_row(s, model, input_ids, lengths, y, device, rows[0]["accuracy"], log)
    return {
        "criterion": s.criterion,
        "num_layers": depth,
        "num_examples": int(input_ids.shape[0]),
        "device": str(device),
        "metric": metric,
        "per_exit_accuracy": per_exit,
        "full_depth_accuracy": rows[0]["accuracy"],
        "rows": rows,
        "ensemble": ensemble,
        "offline_curve": None if curve is None else {k: v.tolist() for k, v in curve.items()},
    }


def ensemble_row(s, model, input_ids, lengths, y, device, full, log):
    """The ensemble of this run's ``model`` and the --ensemble runs (``ProbabilityEnsemble``: the
    mean of their full-depth class probabilities; with --regression, of their outputs), scored on
    ``input_ids [n, N]`` (``lengths [n]`` real pieces each) against ``y``, one line printed. Returns
    the report's row: ``{"members": [--out, *--ensemble], "accuracy", "delta"}`` (accuracy: the
    MSE with --regression; delta: against this run's full depth ``full``)."""
    from .. import calibration as cal
    from ..data.tsv import batch_rows
    from ..models.ensemble import ProbabilityEnsemble

    try:
        others = ProbabilityEnsemble.from_run_folders(s.ensemble, device=device, backend=s.backend)
    except (ValueError, OSError) as exc:  # changed since the check at the start
        raise UsageError("--ensemble: " + one_line(exc).removeprefix("paths: ")) from None
    ens = ProbabilityEnsemble([model] + others.models, regression=s.regression)
    batch, parts = s.per_device_eval_batch_size, []
    for start in range(0, input_ids.shape[0], batch):
        rows = torch.arange(start, min(start + batch, input_ids.shape[0]))
        ids, mask = batch_rows(input_ids, lengths, rows, device)
        parts.append(ens.predict_proba(ids, mask))
    mean = torch.cat(parts)
    value = cal.score(mean[:, None] if s.regression else mean, y, s.regression)
    metric = "mse" if s.regression else "accuracy"
    log(
        f"\nensemble of this run and {len(others)} --ensemble run(s), the mean of their full-depth "
        f"{'outputs' if s.regression else 'probabilities'}: {metric} {value:.4f} "
        f"({value - full:+.4f} against this run's full depth)"
    )
    return {
        "members": [os.path.abspath(s.out)] + [os.path.abspath(p) for p in s.ensemble],
        "accuracy": value,
        "delta": value - full,
    }


def report_on_eval(s, model, tokenizer, data, max_len, losses, device, log):
    """``evaluate`` on --eval, written to ``report.json`` with the training losses, and its plot."""
    from ..calibration_plot import plot_run
    from ..data.tsv import encode

    input_ids, lengths = encode(tokenizer, data.eval_texts, max_len)
    report = evaluate(s, model, input_ids, lengths, data.eval_targets, device, log)
    k = max(1, len(losses) // 10)
    report.update(
        labels=data.labels,
        train_steps=len(losses),
        train_loss_first=sum(losses[:k]) / k,
        train_loss_last=sum(losses[-k:]) / k,
        losses=losses,
    )
    searched = os.path.join(s.out, EARLY_BIRD_FILE)
    if os.path.isfile(searched):  # --early-bird: the search and its ticket
        with open(searched, encoding="utf-8") as f:
            report["early_bird"] = json.load(f)
    atomic_write(json.dumps(report, indent=2) + "\n", os.path.join(s.out, REPORT_FILE))
    path = os.path.abspath(os.path.join(s.out, PLOT_FILE))
    log(f"\nreport: {os.path.abspath(os.path.join(s.out, REPORT_FILE))}")
    drawn = plot_run(
        path,
        losses,
        points=[(r["speedup"], r["accuracy"]) for r in report["rows"][1:]],
        full_accuracy=report["full_depth_accuracy"],
        depth=report["num_layers"],
        criterion=report["criterion"],
        curve=report["offline_curve"],
        loss_title="Multi-exit fine-tuning",
    )
    log(
        f"plot (loss, speed-accuracy): {path}"
        if drawn
        else "matplotlib is not installed: no plot written (pip install matplotlib)"
    )
    return report
