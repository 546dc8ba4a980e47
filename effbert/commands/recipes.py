"""``--recipe NAME``: the published training settings of one method, for ``effbert pretrain`` (``tupe``, ``mcbert``,
``tnf``) and ``effbert finetune`` (``deebert``, ``pabee``, ``romebert``).

A recipe fills in the flags the user did not give; a flag on the command line always wins. Each value is what the
paper or its official code states (the source is next to it, and the tables in docs/pretrain.md and
docs/finetune.md repeat them); what the source leaves open, or what is a cluster's scale rather than a setting
(1M steps of 256 sequences of 512 tokens), the recipe leaves to effbert's defaults and the user's flags.
"""

import argparse
import os

from . import UsageError

__all__ = ["RECIPES", "Share", "apply", "explicit_dests", "checker", "check_optimizer_flags"]


class Share(float):
    """A warm-up given as a share of the run's steps (fairseq's 10k of 1M updates): the recipe's
    value becomes ``--warmup-steps round(share * --max-steps)``, the count the line shows."""


# name: (command, method, {argparse dest: value}, {dest: source}). Only what the source states.
RECIPES = {
    "tupe": (
        "pretrain",
        "TUPE (Ke, He, Liu, ICLR 2021)",
        {
            "objective": "mlm",
            "tnf": False,
            "learning_rate": 1e-4,
            "warmup_steps": Share(0.01),
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-6,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "mask_replace_prob": 0.8,
            "random_replace_prob": 0.1,
        },
        {
            "*": "guolinke/TUPE README.md, Pre-Training: --lr 0.0001 --warmup-updates 10000 --total-num-update 1000000 "
            "--adam-betas '(0.9, 0.999)' --adam-eps 1e-6 --clip-norm 1.0 --weight-decay 0.01 --mask-prob 0.15",
            "mask_replace_prob": "fairseq/tasks/masked_lm.py defaults --leave-unmasked-prob 0.1 --random-token-prob 0.1",
            "random_replace_prob": "fairseq/tasks/masked_lm.py defaults --leave-unmasked-prob 0.1 --random-token-prob 0.1",
        },
    ),
    "mcbert": (
        "pretrain",
        "MC-BERT (Xu et al., 2020)",
        {
            "objective": "mcbert",
            "tnf": False,
            "learning_rate": 1e-4,
            "warmup_steps": Share(0.01),
            "adam_beta1": 0.9,
            "adam_beta2": 0.98,
            "adam_epsilon": 1e-6,
            "weight_decay": 0.01,
            "max_grad_norm": 0.0,
            "mask_replace_prob": 1.0,
            "random_replace_prob": 0.0,
        },
        {
            "*": "MC-BERT/MC-BERT README.md, MC-BERT pre-training: --lr 0.0001 --warmup-updates 10000 "
            "--total-num-update 1000000 --adam-betas '(0.9, 0.98)' --adam-eps 1e-6 --clip-norm 0.0 "
            "--weight-decay 0.01 --mask-prob 0.15",
            "mask_replace_prob": "fairseq/tasks/mcbert.py defaults --leave-unmasked-prob 0.0 --random-token-prob 0.0",
            "random_replace_prob": "fairseq/tasks/mcbert.py defaults --leave-unmasked-prob 0.0 --random-token-prob 0.0",
        },
    ),
    "tnf": (
        "pretrain",
        "TNF (Wu et al., ICLR 2021)",
        {
            "objective": "mlm",
            "tnf": True,
            "learning_rate": 1e-4,
            "warmup_steps": Share(0.01),
            "adam_beta1": 0.9,
            "adam_beta2": 0.98,
            "adam_epsilon": 1e-6,
            "weight_decay": 0.01,
        },
        {
            "*": "TNF paper, Sec. 4.1 (experimental setup): Adam, eps 1e-6, (beta1, beta2) = (0.9, 0.98), peak lr 1e-4 "
            "after a 10k-step warm-up of 1000k steps, then linear decay to 0, weight decay 0.01",
        },
    ),
    "deebert": (
        "finetune",
        "DeeBERT (Xin et al., ACL 2020)",
        {
            "loss": "deebert",
            "criterion": "entropy",
            "learning_rate": 2e-5,
            "warmup_steps": 0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "per_device_train_batch_size": 8,
            "num_train_epochs": 3.0,
            "max_seq_length": 128,
        },
        {
            "*": "castorini/DeeBERT scripts/train_highway.sh (bert: --learning_rate 2e-5 --per_gpu_train_batch_size=8 on "
            "one GPU, EPOCHS=3, --max_seq_length 128) and examples/run_highway_glue.py defaults (--weight_decay 0.0 "
            "--adam_epsilon 1e-8 --max_grad_norm 1.0 --warmup_steps 0); AdamW's betas (0.9, 0.999) "
            "(transformers/optimization.py)",
        },
    ),
    "pabee": (
        "finetune",
        "PABEE (Zhou et al., NeurIPS 2020)",
        {
            "loss": "pabee",
            "shared_pooler": True,
            "criterion": "patience",
            "learning_rate": 2e-5,
            "warmup_steps": 0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "per_device_train_batch_size": 32,
            "num_train_epochs": 5.0,
            "max_seq_length": 128,
        },
        {
            "*": "JetRunner/PABEE finetune_bert.sh (--learning_rate 2e-5 --per_gpu_train_batch_size 32 "
            "--num_train_epochs 5 --max_seq_length 128) and run_glue.py defaults (--weight_decay 0.0 --adam_epsilon "
            "1e-8 --max_grad_norm 1.0 --warmup_steps 0); transformers' AdamW betas (0.9, 0.999); one pooler before "
            "every classifier (pabee/modeling_bert.py); patience_infer_bert.sh --patience",
        },
    ),
    "romebert": (
        "finetune",
        "RomeBERT (Geng et al., 2021)",
        {
            "loss": "romebert",
            "gamma": 0.9,
            "temperature": 3.0,
            "criterion": "entropy",
            "learning_rate": 2e-5,
            "warmup_steps": 0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "per_device_train_batch_size": 8,
            "num_train_epochs": 3.0,
            "max_seq_length": 128,
        },
        {
            "*": "romebert/RomeBERT scripts/train_high.sh and new_scripts/train_high.sh (bert: --learning_rate 2e-5 "
            "--per_gpu_train_batch_size=8 on one GPU, EPOCHS=3, --max_seq_length 128, --gamma 0.9 --temper 3.0 "
            "--kd_loss_type raw) and examples/new_run_highway_glue.py defaults (--weight_decay 0.0 --adam_epsilon "
            "1e-8 --max_grad_norm 1.0 --warmup_steps 0); AdamW's betas (0.9, 0.999)",
        },
    ),
}


def check_optimizer_flags(a):
    """``--adam-beta1``/``--adam-beta2`` in [0, 1), ``--adam-epsilon`` > 0, ``--max-grad-norm`` >= 0 (0: no
    clipping), each finite; None (not given) passes. A ``UsageError`` naming the flag."""
    import math

    for dest, ok, what in (
        ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("adam_epsilon", lambda v: v > 0, "> 0"),
        ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ):
        v = getattr(a, dest, None)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise UsageError(f"--{dest.replace('_', '-')} must be {what}, got {v}")


def names(command):
    return [n for n, r in RECIPES.items() if r[0] == command]


def explicit_dests(build_parser, argv):
    """The argparse dests given on the command line ``argv`` (a fresh parser whose defaults are all suppressed
    parses it again: what is left in the namespace was typed)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    for group in p._action_groups:
        group._defaults = {}
    p._defaults = {}
    return set(vars(p.parse_known_args(argv)[0]))


# settings that say one thing two ways: a recipe's value for one is not set when the user gave the
# other
ALTERNATIVES = {
    "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_steps",
    "per_device_train_batch_size": "batch_size",
    "batch_size": "per_device_train_batch_size",
}


def _flag(parser, dest, value):
    """``value`` of ``dest`` as it would be typed: ``--no-tnf``, ``--shared-pooler``, ``--lr 2e-05``."""
    for action in parser._actions:
        if action.dest != dest or not action.option_strings:
            continue
        # store_true, or a settings switch
        if action.nargs == 0 or getattr(action, "is_switch", False):
            if action.const == value:
                return action.option_strings[0]
            continue
        return (
            f"{action.option_strings[0]} {value:g}"
            if isinstance(value, float)
            else f"{action.option_strings[0]} {value}"
        )
    raise KeyError(dest)


def apply(a, command, build_parser, argv):
    """Set ``a``'s recipe values (``a.recipe``) where the user gave no flag; return the line to print (None without
    a recipe). A recipe of the other command, or an unknown name, is a ``UsageError`` naming it. Under ``--resume`` a
    pretraining run keeps the values its run file recorded: nothing is set, the name is only checked."""
    name = getattr(a, "recipe", None)
    if name is None:
        return None
    if name not in RECIPES:
        raise UsageError(
            f"--recipe {name!r}: no such recipe (pretrain: {', '.join(names('pretrain'))}; "
            f"finetune: {', '.join(names('finetune'))})"
        )
    owner, method, values, _ = RECIPES[name]
    if owner != command:
        raise UsageError(
            f"--recipe {name} is a recipe of effbert {owner}, not {command} (effbert {command}'s: "
            f"{', '.join(names(command))})"
        )
    if command == "pretrain" and getattr(a, "resume", False):
        return None  # the run file holds the values the run started with; a different recipe is refused there
    given = explicit_dests(build_parser, argv)
    parser = build_parser()
    used, kept = [], []
    for dest, value in values.items():
        if dest in given:
            kept.append(_flag(parser, dest, getattr(a, dest)))
            continue
        if ALTERNATIVES.get(dest) in given:  # the user said it the other way
            continue
        shown = None
        if isinstance(value, Share):
            shown = f"{100 * value:g}% of --max-steps"
            value = round(value * a.max_steps)
        setattr(a, dest, value)
        used.append(_flag(parser, dest, value) + (f" ({shown})" if shown else ""))
    line = f"recipe {name}, {method}: {' '.join(used)}"
    return line + (f"; yours kept: {' '.join(kept)}" if kept else "")


def checker(command, build_parser, argv, check):
    """The ``check`` of ``run_command`` with the recipe first: apply it, check every flag, then print its line
    (on the first process only under torchrun)."""

    def run(a):
        line = apply(a, command, build_parser, argv)
        check(a)
        if line and int(os.environ.get("RANK", "0")) == 0:
            print(line, flush=True)

    return run
