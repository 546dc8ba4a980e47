"""``effbert finetune``: multi-exit classification on a user's own labelled text through
``transformers.Trainer``, then a speed-accuracy report of batched early exit over exit thresholds.

    effbert finetune --hf ./bert-base-uncased --train train.tsv --eval dev.tsv --out run/
    effbert finetune --init pretrain-run/ --train train.tsv --eval dev.tsv --out run/ \
        --num-train-epochs 3
    effbert finetune --task token-classification --hf ./bert --train train.conll \
        --eval dev.conll --out run/ --self-sampling-steps 500 --target-exit 6

This module is the command line only: the settings (each flag's default and help, once), their
validation in ``check``, then ``effbert.training.finetune.run``, which reads in the order the run
goes (docs/finetune.md says which published setting each option reproduces; the token task is
``effbert.training.finetune_tokens.run``, docs/token_exit.md). The folder it writes is
``load_finetuned``'s (``effbert.models.loading``).
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

from . import check_backend, check_out_dir, parse_device, run_command
from .recipes import check_optimizer_flags, checker
from .settings import UsageError, fail_if, option, parser, stderr_is_terminal
from ..models.loading import load_finetuned  # noqa: F401  (the public loader, where it was)
from ..training.run_folder import default_backend

from ..models.multi_exit import EXIT_LOSSES as LOSSES
from ..training.adversarial import ADVERSARIAL_METHODS, NORM_TYPES

PROJECT = ("others", "final")
TASKS = ("sequence-classification", "token-classification")
COPY_WORDPIECES = ("all", "first")
CRITERIA = ("entropy", "max_prob", "patience")
DEFAULT_PER_DEVICE_BATCH, DEFAULT_WARMUP_RATIO = 32, 0.1


@dataclass
class FinetuneSettings:
    """What ``effbert finetune`` is told: one field a flag (``--per-device-train-batch-size`` is
    ``per_device_train_batch_size``), Trainer's names where Trainer has the concept."""

    train: str = option(
        metavar="FILE",
        help="training examples: label<TAB>text a line (TSV), or with --task token-classification "
        "a CoNLL file (a token and its BIO label a line, a blank line between sentences)",
    )
    out: str = option(
        metavar="DIR", help="folder for the fine-tuned model and the report (new or empty)"
    )
    eval: Optional[str] = option(
        None,
        metavar="FILE",
        help="held-out examples for the accuracy and early-exit report (as --train)",
    )
    task: str = option(
        "sequence-classification",
        choices=TASKS,
        help="sequence-classification (a label a text) or token-classification (a BIO label a "
        "word, TOKEE/SENTEE early exit: docs/token_exit.md)",
    )
    init: Optional[str] = option(
        None, metavar="DIR", help="an effbert pretrain output folder (or --hf)"
    )
    hf: Optional[str] = option(
        None,
        metavar="DIR",
        help="a local Hugging Face BERT folder: config, weights, vocab.txt (or --init)",
    )
    overwrite: bool = option(
        False,
        help="replace an earlier effbert finetune run in --out (never another kind of folder)",
    )
    max_seq_length: int = option(
        128, metavar="N", help="longest input in pieces, [CLS] and [SEP] included"
    )
    cased: Optional[bool] = option(
        None,
        nargs="?",
        const=True,
        help="keep case and accents (default: as the checkpoint's tokenizer, else lowercase)",
    )
    num_train_epochs: float = option(
        3.0, metavar="X", help="passes over --train (unless --max-steps)"
    )
    max_steps: Optional[int] = option(
        None, metavar="N", help="optimizer steps in all (overrides --num-train-epochs)"
    )
    batch_size: Optional[int] = option(
        None,
        metavar="N",
        help="global examples an optimizer step (all processes x accumulation); or "
        "--per-device-train-batch-size",
    )
    per_device_train_batch_size: Optional[int] = option(
        None,
        metavar="N",
        help="examples a micro-batch on each device (default 32); or --batch-size",
    )
    gradient_accumulation_steps: int = option(
        1, metavar="N", help="micro-batches an optimizer step"
    )
    learning_rate: float = option(
        5e-5, metavar="X", help="peak AdamW learning rate; linear decay to 0"
    )
    warmup_steps: Optional[int] = option(
        None, metavar="N", help="optimizer steps of linear warm-up; or --warmup-ratio"
    )
    warmup_ratio: Optional[float] = option(
        None,
        metavar="X",
        help="share of the steps with a linear warm-up (default 0.1); or --warmup-steps",
    )
    weight_decay: float = option(0.01, metavar="X", help="AdamW weight decay")
    adam_beta1: float = option(0.9, metavar="X", help="AdamW beta1")
    adam_beta2: float = option(0.999, metavar="X", help="AdamW beta2")
    adam_epsilon: float = option(1e-8, metavar="X", help="AdamW epsilon")
    max_grad_norm: float = option(
        1.0, metavar="X", help="clip the gradient norm to this (0: no clipping)"
    )
    recipe: Optional[str] = option(
        None,
        help="a paper's published settings for the flags not given: deebert, pabee or romebert "
        "(docs/finetune.md lists each value and its source)",
    )
    loss: str = option(
        "romebert",
        choices=LOSSES,
        help="romebert: joint training with self-distillation from the last exit (RomeBERT); "
        "pabee: layer-weighted loss (PABEE); deebert: two stages, backbone then off-ramps "
        "(DeeBERT)",
    )
    gamma: float = option(
        0.9, metavar="X", help="RomeBERT: weight of the distillation term (its published value)"
    )
    temperature: float = option(
        3.0, metavar="X", help="RomeBERT: distillation temperature (its published value)"
    )
    grad_reg: bool = option(
        False,
        help="RomeBERT's gradient regularization (--gp): one projection of the concatenated "
        "gradients of every layer but the last",
    )
    project: str = option(
        "others",
        choices=PROJECT,
        help="with --grad-reg, the side projected: others (the other exits' gradient off the last "
        "exit's: RomeBERT on MNLI/QQP) or final (the reverse)",
    )
    ge: bool = option(
        False, help="RomeBERT's gradient equilibrium: exit i's gradient scaled by 1/(L - i)"
    )
    shared_pooler: bool = option(
        False,
        help="one pooler shared by every off-ramp (PABEE); by default each has its own, copied "
        "from the checkpoint's (DeeBERT, RomeBERT)",
    )
    regression: bool = option(
        False,
        help="labels are numbers: a one-output head trained with mean squared error; the report "
        "gives MSE instead of accuracy",
    )
    regression_delta: float = option(
        0.1,
        metavar="X",
        help="with --regression: a prediction counts as unchanged when it moves by less than this "
        "(PABEE's rule)",
    )
    seed: int = option(
        0, metavar="N", help="seed of the weights' initialisation, the data order and dropout"
    )
    device: Optional[str] = option(None, help="cpu, cuda or cuda:N (default: cuda when available)")
    backend: Optional[str] = option(
        None, help="effbert op backend (default: auto; eager under the Triton interpreter)"
    )
    fp16: bool = option(False, help="fp16 mixed precision with loss scaling (CUDA)")
    bf16: bool = option(False, help="bf16 mixed precision")
    logging_steps: int = option(50, metavar="N", help="print the mean loss every N steps")
    save_steps: int = option(
        500,
        metavar="N",
        help="keep a checkpoint every N steps and at the end, in DIR/checkpoints (0: none)",
    )
    save_total_limit: int = option(
        2, metavar="N", help="newest complete checkpoints kept (the oldest go)"
    )
    resume: bool = option(
        False,
        help="continue the run in --out from its newest complete checkpoint (the same command "
        "line, plus --resume)",
    )
    reshape_schedule: bool = option(
        False,
        help="with --resume and more steps: stretch the learning-rate schedule to them (default: "
        "keep the run's)",
    )
    report_to: Optional[list[str]] = option(
        None, metavar="NAME", help="Trainer's report_to: tensorboard, wandb, ... (default: none)"
    )
    quiet: bool = option(
        False, help="no progress bar (there is none when stderr is not a terminal)"
    )
    early_bird: bool = option(
        False,
        help="EarlyBERT (docs/early_bird.md): search a ticket of heads and FFN neurons, then "
        "fine-tune the pruned model from the pre-search weights",
    )
    early_bird_search_steps: int = option(
        0, metavar="N", help="steps of the search at most (0: one epoch)"
    )
    early_bird_l1: float = option(1e-4, metavar="X", help="L1 on the head and FFN coefficients")
    early_bird_head_ratio: float = option(
        0.333333, metavar="X", help="share of each layer's heads pruned"
    )
    early_bird_ffn_ratio: float = option(0.4, metavar="X", help="share of all FFN neurons pruned")
    early_bird_draw_every: int = option(10, metavar="N", help="draw a ticket every N search steps")
    early_bird_threshold: float = option(
        0.1,
        metavar="X",
        help="stop when successive tickets differ by less than this (normalised Hamming)",
    )
    early_bird_patience: int = option(5, metavar="N", help="... that many draws in a row")
    criterion: str = option("entropy", choices=CRITERIA, help="the early-exit report's exit rule")
    per_device_eval_batch_size: int = option(
        128, metavar="N", help="examples a batch in the early-exit report"
    )
    # AT-BERT: adversarial fine-tuning on the word embeddings, and an ensemble in the evaluation
    adversarial: Optional[str] = option(
        None,
        choices=ADVERSARIAL_METHODS,
        help="adversarial fine-tuning on the word embeddings: fgm, pgd or freelb "
        "(docs/adversarial.md; DeeBERT: its stage 1 only; not with --grad-reg)",
    )
    adv_epsilon: float = option(
        1.0,
        metavar="X",
        help="fgm: the step on the word-embedding weight; pgd: the radius of its L2 ball",
    )
    adv_alpha: float = option(0.3, metavar="X", help="pgd: the step of each ascent move")
    adv_steps: int = option(3, metavar="N", help="pgd: its K moves; freelb: its ascent passes")
    adv_lr: float = option(0.1, metavar="X", help="freelb: the ascent step size")
    adv_init_mag: float = option(
        1.0, metavar="X", help="freelb: the size of the random start (0: start at zero)"
    )
    adv_max_norm: float = option(
        0.6, metavar="X", help="freelb: the bound on each text's perturbation norm (0: no bound)"
    )
    adv_norm_type: str = option(
        "l2", choices=NORM_TYPES, help="freelb: the norm of its steps and bound, l2 or linf"
    )
    adv_no_clean: bool = option(
        False,
        help="freelb: train on the perturbed inputs only, as the published loop does (by default "
        "a clean pass comes first)",
    )
    ensemble: Optional[list[str]] = option(
        None,
        metavar="DIR",
        help="earlier effbert finetune run folders (same labels, tokenizer and "
        "--max-seq-length) whose probabilities are averaged with this run's in the --eval "
        "report",
    )
    # token classification (Li et al., ACL 2021): stage 2 and the report (docs/token_exit.md)
    self_sampling_steps: int = option(
        0,
        metavar="N",
        help="token-classification: optimizer steps of stage 2, self-sampling fine-tuning of the "
        "stage-1 model (0: stage 1 only)",
    )
    self_sampling_learning_rate: float = option(
        1e-4, metavar="X", help="stage 2: peak learning rate of the classifiers (published --lr)"
    )
    self_sampling_encoder_lr_scale: float = option(
        0.1,
        metavar="X",
        help="stage 2: the encoder's learning rate over the classifiers' (published --ptm_lr_rate)",
    )
    no_flooding: bool = option(
        False,
        help="stage 2 without flooding (on in the published stage 2: each term |CE - stage-1 CE "
        "- --flooding-bias|)",
    )
    flooding_bias: float = option(
        0.0, metavar="X", help="stage 2: the constant added to the flooding level"
    )
    sandwich_small: int = option(
        2, metavar="N", help="stage 2: samples a batch drawn at the most aggressive exit setting"
    )
    sandwich_full: int = option(
        3, metavar="N", help="stage 2: samples a batch that run at full depth"
    )
    copy_wordpieces: str = option(
        "all",
        choices=COPY_WORDPIECES,
        help="token-classification: the pieces of an exited word that stop, all or the first",
    )
    window: int = option(
        5, metavar="N", help="token-classification: TOKEE's window over words (odd)"
    )
    token_exit_thresholds: list[float] = option(
        [0.05, 0.1, 0.2, 0.4],
        metavar="X",
        nargs="+",
        help="token-classification: the report's thresholds (TOKEE: X for the first half of the "
        "layers, 2X after, as published; SENTEE: X at every layer)",
    )
    target_exit: Optional[float] = option(
        None,
        metavar="X",
        help="token-classification: calibrate the TOKEE threshold on --eval for an average exit "
        "layer of at least X, record it in the model's folder",
    )


def build_parser():
    """The ``effbert finetune`` parser: ``parse_args`` returns a ``FinetuneSettings``."""
    return parser(
        FinetuneSettings,
        "effbert finetune",
        "Multi-exit classification on your labelled text, then an early-exit report.",
    )


def _check_numbers(s):
    """Every number in its range, each rule one line naming its flag."""
    fail_if(
        s.max_steps is not None and s.max_steps < 1, f"--max-steps must be >= 1, got {s.max_steps}"
    )
    fail_if(
        not (s.num_train_epochs > 0 and math.isfinite(s.num_train_epochs)),
        f"--num-train-epochs must be > 0, got {s.num_train_epochs}",
    )
    for flag, v in (
        ("--batch-size", s.batch_size),
        ("--per-device-train-batch-size", s.per_device_train_batch_size),
        ("--per-device-eval-batch-size", s.per_device_eval_batch_size),
        ("--gradient-accumulation-steps", s.gradient_accumulation_steps),
        ("--logging-steps", s.logging_steps),
        ("--save-total-limit", s.save_total_limit),
    ):
        fail_if(v is not None and v < 1, f"{flag} must be >= 1, got {v}")
    fail_if(s.save_steps < 0, f"--save-steps must be >= 0, got {s.save_steps}")
    fail_if(
        not (s.learning_rate > 0 and math.isfinite(s.learning_rate)),
        f"--learning-rate must be > 0, got {s.learning_rate}",
    )
    fail_if(
        s.warmup_steps is not None and s.warmup_steps < 0,
        f"--warmup-steps must be >= 0, got {s.warmup_steps}",
    )
    fail_if(
        s.warmup_ratio is not None and not 0 <= s.warmup_ratio < 1,
        f"--warmup-ratio must be in [0, 1), got {s.warmup_ratio}",
    )
    fail_if(not s.weight_decay >= 0, f"--weight-decay must be >= 0, got {s.weight_decay}")
    check_optimizer_flags(s)
    fail_if(not 0 <= s.gamma <= 1, f"--gamma must be in [0, 1], got {s.gamma}")
    fail_if(
        not (s.temperature > 0 and math.isfinite(s.temperature)),
        f"--temperature must be > 0, got {s.temperature}",
    )
    fail_if(
        not (s.regression_delta > 0 and math.isfinite(s.regression_delta)),
        f"--regression-delta must be > 0, got {s.regression_delta}",
    )
    fail_if(s.max_seq_length < 3, f"--max-seq-length must be >= 3, got {s.max_seq_length}")
    _check_early_bird(s)


def _check_early_bird(s):
    """The ``--early-bird-*`` numbers in their ranges."""
    for flag, v, low in (
        ("--early-bird-search-steps", s.early_bird_search_steps, 0),
        ("--early-bird-draw-every", s.early_bird_draw_every, 1),
        ("--early-bird-patience", s.early_bird_patience, 1),
    ):
        fail_if(v < low, f"{flag} must be >= {low}, got {v}")
    fail_if(
        not (s.early_bird_l1 >= 0 and math.isfinite(s.early_bird_l1)),
        f"--early-bird-l1 must be >= 0, got {s.early_bird_l1}",
    )
    for flag, v in (
        ("--early-bird-head-ratio", s.early_bird_head_ratio),
        ("--early-bird-ffn-ratio", s.early_bird_ffn_ratio),
    ):
        fail_if(not 0 <= v < 1, f"{flag} must be in [0, 1), got {v}")
    fail_if(
        not 0 <= s.early_bird_threshold <= 1,
        f"--early-bird-threshold must be in [0, 1], got {s.early_bird_threshold}",
    )


def _resolve_batch_and_warmup(s):
    """One of each exclusive pair, then the per-device batch and the warm-up share Trainer is
    given."""
    fail_if(
        s.batch_size is not None and s.per_device_train_batch_size is not None,
        "--batch-size (global) and --per-device-train-batch-size exclude each other: give one",
    )
    fail_if(
        s.warmup_steps is not None and s.warmup_ratio is not None,
        "--warmup-steps and --warmup-ratio exclude each other: give one",
    )
    if s.batch_size is not None:
        share = int(os.environ.get("WORLD_SIZE", "1")) * s.gradient_accumulation_steps
        fail_if(
            s.batch_size % share,
            f"--batch-size {s.batch_size} is not a multiple of "
            f"processes x --gradient-accumulation-steps ({share})",
        )
        s.per_device_train_batch_size = s.batch_size // share
    elif s.per_device_train_batch_size is None:
        s.per_device_train_batch_size = DEFAULT_PER_DEVICE_BATCH
    if s.warmup_steps is None and s.warmup_ratio is None:
        s.warmup_ratio = DEFAULT_WARMUP_RATIO


# the --adv-* flags, the methods each applies to (docs/adversarial.md), and the config's field
ADV_FLAGS = {
    "adv_epsilon": (("fgm", "pgd"), "epsilon"),
    "adv_alpha": (("pgd",), "alpha"),
    "adv_steps": (("pgd", "freelb"), "steps"),
    "adv_lr": (("freelb",), "adv_lr"),
    "adv_init_mag": (("freelb",), "adv_init_mag"),
    "adv_max_norm": (("freelb",), "adv_max_norm"),
    "adv_norm_type": (("freelb",), "norm_type"),
    "adv_no_clean": (("freelb",), None),
}


def _check_adversarial_and_ensemble(s):
    """--adversarial and its --adv-* flags (a flag off its default goes with a method it applies to;
    the numbers as ``AdversarialConfig`` checks them), then --ensemble's folders (that they are
    finetune runs is checked here; their labels and tokenizer once this run's are known)."""
    from ..training.finetune import adversarial_config

    fail_if(
        s.adversarial is not None and s.grad_reg,
        "--adversarial does not combine with --grad-reg (RomeBERT's projection runs its own "
        "backward passes)",
    )
    defaults = FinetuneSettings.__dataclass_fields__
    for name, (methods, _) in ADV_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if getattr(s, name) != defaults[name].default:
            fail_if(s.adversarial is None, f"{flag} goes with --adversarial {'|'.join(methods)}")
            fail_if(
                s.adversarial not in methods,
                f"{flag} applies to --adversarial {' or '.join(methods)}, not {s.adversarial}",
            )
    try:
        adversarial_config(s)
    except ValueError as exc:  # the config's field, spelt as its flag
        field, rest = str(exc).split(" ", 1)
        flag = next((n for n, (_, f) in ADV_FLAGS.items() if f == field), field)
        raise UsageError(f"--{flag.replace('_', '-')} {rest}") from None
    if s.ensemble is None:
        return
    fail_if(s.eval is None, "--ensemble goes with --eval (the ensemble is scored there)")
    for path in s.ensemble:
        fail_if(not os.path.isdir(path), f"--ensemble: {path!r} is not a folder")
        fail_if(
            os.path.isdir(s.out) and os.path.samefile(path, s.out),
            f"--ensemble: {path!r} is --out, which this run replaces",
        )
        fail_if(
            not os.path.isfile(os.path.join(path, "finetune.json")),
            f"--ensemble: {path!r} holds no finetune.json: not an effbert finetune run",
        )


# the sequence task's own flags: off their default, refused with --task token-classification
SEQUENCE_ONLY = (
    "loss",
    "gamma",
    "temperature",
    "grad_reg",
    "project",
    "ge",
    "shared_pooler",
    "regression",
    "regression_delta",
    "criterion",
    "early_bird",
    "adversarial",
    "ensemble",
    "recipe",
)
# the token task's own flags: off their default, refused with --task sequence-classification
TOKEN_ONLY = (
    "self_sampling_steps",
    "self_sampling_learning_rate",
    "self_sampling_encoder_lr_scale",
    "no_flooding",
    "flooding_bias",
    "sandwich_small",
    "sandwich_full",
    "copy_wordpieces",
    "window",
    "token_exit_thresholds",
    "target_exit",
)
# the settings of the self-sampling stage: refused without its steps
STAGE_TWO = (
    "self_sampling_learning_rate",
    "self_sampling_encoder_lr_scale",
    "no_flooding",
    "flooding_bias",
    "sandwich_small",
    "sandwich_full",
)


def _flag(name):
    return "--" + name.replace("_", "-")


def _check_task(s):
    """The flags of the other task left at their defaults, and the token task's numbers in range,
    each rule one line naming its flag."""
    fields = FinetuneSettings.__dataclass_fields__

    def changed(name):
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        return getattr(s, name) != default

    if s.task != "token-classification":
        for name in TOKEN_ONLY:
            fail_if(changed(name), f"{_flag(name)} goes with --task token-classification")
        return
    for name in SEQUENCE_ONLY:
        fail_if(
            changed(name),
            f"{_flag(name)} applies to --task sequence-classification (token classification "
            "trains the published joint loss, PABEE's weights, then self-sampling)",
        )
    fail_if(
        s.self_sampling_steps < 0,
        f"--self-sampling-steps must be >= 0, got {s.self_sampling_steps}",
    )
    for name in STAGE_TWO:
        fail_if(
            changed(name) and not s.self_sampling_steps,
            f"{_flag(name)} is a stage-2 setting: it goes with --self-sampling-steps N",
        )
    for flag, v in (
        ("--self-sampling-learning-rate", s.self_sampling_learning_rate),
        ("--self-sampling-encoder-lr-scale", s.self_sampling_encoder_lr_scale),
    ):
        fail_if(not (v > 0 and math.isfinite(v)), f"{flag} must be > 0, got {v}")
    fail_if(
        not math.isfinite(s.flooding_bias), f"--flooding-bias must be finite, got {s.flooding_bias}"
    )
    for flag, v in (("--sandwich-small", s.sandwich_small), ("--sandwich-full", s.sandwich_full)):
        fail_if(v < 0, f"{flag} must be >= 0, got {v}")
    fail_if(
        s.window < 1 or s.window % 2 == 0, f"--window must be an odd number >= 1, got {s.window}"
    )
    fail_if(
        not all(t > 0 and math.isfinite(t) for t in s.token_exit_thresholds),
        f"--token-exit-thresholds must be > 0, got {s.token_exit_thresholds}",
    )
    if s.eval is not None:  # the report's entity F1, before any work
        from ..token_metrics import require_seqeval

        try:
            require_seqeval()
        except ImportError as exc:
            raise UsageError(f"--eval: {exc}") from None
    if s.target_exit is not None:
        fail_if(
            not (s.target_exit >= 1 and math.isfinite(s.target_exit)),
            f"--target-exit must be >= 1 (an average exit layer), got {s.target_exit}",
        )
        fail_if(
            s.eval is None, "--target-exit goes with --eval (the threshold is calibrated there)"
        )


def check(s):
    """Validate ``s`` (a ``FinetuneSettings``) before any work, in one place, and settle what the
    flags leave open (the per-device batch, the warm-up, the backend, the progress bar); then take
    the run folder."""
    from ..training.finetune import open_run_folder

    fail_if(
        s.init is None and s.hf is None,
        "give one of --init DIR (an effbert pretrain output) or --hf DIR (a Hugging Face BERT "
        "folder)",
    )
    fail_if(
        s.init is not None and s.hf is not None, "--hf not allowed with --init: give one of them"
    )
    _check_task(s)
    _check_numbers(s)
    _resolve_batch_and_warmup(s)
    fail_if(s.fp16 and s.bf16, "--fp16 and --bf16 exclude each other: give one")
    fail_if(
        s.grad_reg and (s.loss != "romebert" or s.regression),
        "--grad-reg goes with --loss romebert (classification)",
    )
    fail_if(
        s.regression and s.criterion != "patience",
        "--regression needs --criterion patience (entropy and max_prob need classes)",
    )
    fail_if(s.reshape_schedule and not s.resume, "--reshape-schedule goes with --resume")
    fail_if(
        s.grad_reg and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        "--grad-reg runs on one process: its two backward passes bypass data-parallel gradient "
        "averaging",
    )
    _check_adversarial_and_ensemble(s)
    device = parse_device(s.device)
    check_backend(s.backend, device)
    fail_if(s.fp16 and device.type != "cuda", "--fp16 needs a CUDA device (--bf16 runs on a CPU)")
    s.backend = s.backend if s.backend not in (None, "auto") else default_backend(device)
    s.progress = not s.quiet and stderr_is_terminal()
    check_out_dir(s.out)
    s.run_folder = open_run_folder(s)  # held until the run ends (run_command releases it)


def main(argv=None):
    from ..training import finetune

    argv = sys.argv[1:] if argv is None else list(argv)
    check_all = checker("finetune", build_parser, argv, check)  # the recipe first, then check
    return run_command("effbert finetune", build_parser(), check_all, finetune.run, argv)


if __name__ == "__main__":
    sys.exit(main())
