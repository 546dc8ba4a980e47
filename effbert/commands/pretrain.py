"""``effbert pretrain``: masked-LM pretraining of a TUPE BERT on your own text, with TNF notes.

    effbert pretrain --data corpus.txt --vocab-size 8000 --out run1 --layers 4 --hidden 256 \\
        --heads 4 --max-steps 10000
    effbert pretrain --data corpus.txt --out run1 --resume  # from its newest complete checkpoint
    torchrun --nproc_per_node 8 -m effbert.commands pretrain --data corpus.txt --out run1 ...

Parsing and wiring only: :class:`PretrainSettings` (one field a flag, its default and help
once), :func:`check` (every flag, before any work), then :func:`effbert.training.pretrain.run`,
which trains over ``transformers.Trainer``. The corpus: one sentence or paragraph a line, a blank
line between documents (``effbert.data.corpus``); masking: BERT's 80/10/10 of 15% of the pieces,
or MC-BERT's published task with ``--objective mcbert``; TNF notes for the words seen
``--tnf-min-count`` to ``--tnf-max-count`` times. ``effbert.models.load_pretrained(DIR)`` gives
back the model, the tokenizer and the rare-word table.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass

from . import check_backend, check_out_dir, parse_device, run_command
from . import settings as flags
from .recipes import check_optimizer_flags, checker
from .settings import fail_if, option
from ..models.loading import load_pretrained  # noqa: F401  (its home is effbert.models)

from ..training.run_folder import RunFolder

__all__ = ["PretrainSettings", "build_parser", "check", "main"]

# The longest --max-seq-length: TUPE-R's relative-position bucket table is max_len**2 int64
# (8192: 512 MiB)
MAX_LEN_LIMIT = 8192
EVAL_HELP = (
    "held-out text in --data's format: its masked-LM loss and perplexity at "
    "--eval-steps and at the end (with --objective mcbert: the loss MC-BERT trains, "
    "masked LM + lambda x multi-choice, and no perplexity)"
)


@dataclass
class PretrainSettings:
    """The flags of ``effbert pretrain``. None: not given (a resumed run keeps its own value, a new
    run the default its help names)."""

    # data and vocabulary
    out: str = option(help="the run folder: model, log, report, DIR/checkpoints", metavar="DIR")
    data: list[str] = option(
        None,
        metavar="FILE",
        help="UTF-8 text files, one sentence or paragraph a line, a blank line between documents",
    )
    eval: str = option(None, metavar="FILE", help=EVAL_HELP)
    vocab: str = option(None, help="a tokenizer: tokenizer.json, a vocab.txt, or a folder of one")
    vocab_size: int = option(
        None,
        help="train a WordPiece vocabulary of at most this many pieces "
        "on the corpus (default 8000 without --vocab)",
    )
    cased: bool = option(None, help="keep case and accents (default: lowercase)")
    pack: bool = option(None, help="several texts a row, attention kept within each (default)")
    mask_replace_prob: float = option(
        None,
        help="the share of the 15%% masked targets made "
        "[MASK] (default 0.8 with mlm, BERT's; 1 with mcbert)",
    )
    random_replace_prob: float = option(
        None, help="the share made a random piece (default 0.1 with mlm, 0 with mcbert)"
    )
    num_proc: int = option(None, help="processes that tokenize the corpus (default 1)")
    cache_dir: str = option(None, help="where datasets caches the tokenized corpus")
    # the model (or --config)
    config: str = option(None, help="a TupeBertConfig JSON file (instead of the size flags)")
    layers: int = option(None, help="encoder layers (default 12)")
    hidden: int = option(None, help="hidden size (default 768)")
    heads: int = option(None, help="attention heads (default 12)")
    intermediate: int = option(None, help="FFN size (default 4 x hidden)")
    max_seq_length: int = option(
        None, help="longest row in pieces, [CLS] and [SEP] included (default 128)"
    )
    position_mode: str = option(
        None, choices=("absolute", "tupe-a", "tupe-r"), help="default tupe-r"
    )
    dropout: float = option(None, help="hidden and attention dropout (default 0.1)")
    objective: str = option(
        None,
        choices=("mlm", "mcbert"),
        help="mlm (default) or mcbert: MC-BERT's multi-choice cloze test with a meta controller",
    )
    # TNF
    tnf: bool = option(None, help="take notes for rare words (default)")
    tnf_min_count: int = option(None, help="a rare word occurs at least this often (default 100)")
    tnf_max_count: int = option(None, help="... and at most this often (default 500)")
    tnf_window: int = option(None, help="tokens each side of a rare word in its note (default 16)")
    tnf_gamma: float = option(None, help="note update rate (default 0.1)")
    tnf_lam: float = option(None, help="weight of the note in the input embedding (default 0.5)")
    # CompoundGrow (docs/growth.md) and EarlyBERT (docs/early_bird.md)
    grow: str = option(
        None,
        metavar="SPEC",
        help="CompoundGrow: grow the model during the run, "
        "e.g. 'layers=2->4@300,ffn=512->1024@300'; it ends at the model's sizes",
    )
    grow_optimizer_state: str = option(
        None,
        choices=("fresh", "grow"),
        help="with --grow, Adam's "
        "state at a growth: fresh (default, the published code's) "
        "or grown with the weights",
    )
    early_bird: bool = option(
        None,
        help="EarlyBERT: search a ticket of heads and FFN neurons, "
        "then train the pruned model from the pre-search weights",
    )
    early_bird_search_steps: int = option(
        None, help="steps of the search at most (default 0: one epoch)"
    )
    early_bird_l1: float = option(None, help="L1 on the head and FFN coefficients (default 1e-4)")
    early_bird_head_ratio: float = option(
        None, help="share of each layer's heads pruned (default 0.333333)"
    )
    early_bird_ffn_ratio: float = option(None, help="share of all FFN neurons pruned (default 0.4)")
    early_bird_draw_every: int = option(
        None, help="draw a ticket every N search steps (default 10)"
    )
    early_bird_threshold: float = option(
        None,
        help="stop when successive tickets differ by less "
        "than this (normalised Hamming; default 0.1)",
    )
    early_bird_patience: int = option(None, help="... that many draws in a row (default 5)")
    # training (transformers.TrainingArguments' names)
    max_steps: int = option(1000, help="optimizer steps in all")
    batch_size: int = option(
        None, help="rows an optimizer step, all ranks and accumulation steps together (default 32)"
    )
    per_device_train_batch_size: int = option(
        None, help="rows a micro-batch on each device (instead of --batch-size)"
    )
    gradient_accumulation_steps: int = option(None, help="micro-batches a step (default 1)")
    learning_rate: float = option(None, help="peak AdamW learning rate (default 1e-4)")
    warmup_steps: int = option(None, help="linear warm-up steps, then linear decay to 0")
    warmup_ratio: float = option(
        None, help="warm-up as a share of --max-steps, floored (default 0.1)"
    )
    weight_decay: float = option(None, help="AdamW weight decay (default 0.01)")
    adam_beta1: float = option(None, help="AdamW beta1 (default 0.9)")
    adam_beta2: float = option(None, help="AdamW beta2 (default 0.999)")
    adam_epsilon: float = option(None, help="AdamW epsilon (default 1e-8)")
    max_grad_norm: float = option(None, help="clip the gradient norm (default 1; 0: no clipping)")
    recipe: str = option(
        None,
        help="a paper's settings for the flags not given: tupe, mcbert, tnf "
        "(docs/pretrain.md gives each value and its source)",
    )
    logging_steps: int = option(50, help="print and log the mean loss every N steps")
    save_steps: int = option(500, help="checkpoint every N steps into DIR/checkpoints (0: none)")
    save_total_limit: int = option(2, help="the newest N complete checkpoints kept")
    eval_steps: int = option(
        None, help="evaluate --eval every N steps (default: at each save and at the end)"
    )
    per_device_eval_batch_size: int = option(
        None, help="rows an evaluation batch on each device (default: the training micro-batch)"
    )
    report_to: list[str] = option(
        ["none"],
        help="Trainer's report_to: none, tensorboard, wandb, "
        "... (tensorboard writes to DIR/checkpoints/runs)",
    )
    fp16: bool = option(False, help="fp16 mixed precision (needs a GPU)")
    bf16: bool = option(False, help="bf16 mixed precision (default fp32)")
    fsdp: str = option(None, help="Trainer's --fsdp option string, e.g. 'full_shard auto_wrap'")
    deepspeed: str = option(None, metavar="JSON", help="a DeepSpeed config file")
    seed: int = option(None, help="default 0")
    device: str = option(None, help="cpu or cuda (default: cuda when available)")
    backend: str = option(
        None, help="effbert op backend (default: auto; eager under the Triton interpreter)"
    )
    resume: bool = option(False, help="continue from the newest complete checkpoint in --out")
    reshape_schedule: bool = option(
        False,
        help="with --resume and another --max-steps: stretch "
        "the learning-rate schedule to it (default: keep the run's)",
    )
    quiet: bool = option(False, help="no progress bar (none either when stderr is not a terminal)")
    dump_state: str = option(None, help=argparse.SUPPRESS)  # tests: each rank's final state


def build_parser():
    """The ``effbert pretrain`` parser: ``parse_args`` returns a :class:`PretrainSettings`."""
    about = __doc__.splitlines()[0].replace("``", "")
    p = flags.parser(PretrainSettings, "effbert pretrain", about)
    p.add_argument(
        "--no-pack", "--no_pack", dest="pack", action="store_false", help="one text a row"
    )
    p.add_argument("--no-tnf", "--no_tnf", dest="tnf", action="store_false", help="no TNF notes")
    return p


# what each number may be: (smallest, largest), None where unbounded; a tuple's third item: the
# largest is excluded
RANGES = {
    **dict.fromkeys(
        (
            "max_steps",
            "batch_size",
            "per_device_train_batch_size",
            "layers",
            "hidden",
            "gradient_accumulation_steps",
            "logging_steps",
            "num_proc",
            "eval_steps",
            "per_device_eval_batch_size",
            "heads",
            "intermediate",
            "tnf_min_count",
            "tnf_max_count",
            "save_total_limit",
            "early_bird_draw_every",
            "early_bird_patience",
        ),
        (1, None),
    ),
    **dict.fromkeys(
        (
            "warmup_steps",
            "save_steps",
            "tnf_window",
            "weight_decay",
            "early_bird_search_steps",
            "early_bird_l1",
        ),
        (0, None),
    ),
    **dict.fromkeys(
        (
            "warmup_ratio",
            "tnf_gamma",
            "tnf_lam",
            "mask_replace_prob",
            "random_replace_prob",
            "early_bird_threshold",
        ),
        (0, 1),
    ),
    **dict.fromkeys(("early_bird_head_ratio", "early_bird_ffn_ratio"), (0, 1, "excluded")),
    "dropout": (0, 1, "excluded"),
    "vocab_size": (6, None),
    "max_seq_length": (3, None),
}
EXCLUSIVE = (
    ("batch_size", "per_device_train_batch_size", "--batch-size (global)"),
    ("warmup_steps", "warmup_ratio", None),
    ("vocab", "vocab_size", None),
    ("fp16", "bf16", None),
)


def _dashed(name):
    return f"--{name.replace('_', '-')}"


def _check_ranges(s):
    for name, (low, high, *open_top) in RANGES.items():
        v = getattr(s, name)
        if v is None:
            continue
        top = high is None or (v < high if open_top else v <= high)
        if not (v >= low and top and math.isfinite(v)):
            where = f">= {low}" if high is None else f"in [{low}, {high}{')' if open_top else ']'}"
            raise flags.UsageError(f"{_dashed(name)} must be {where}, got {v}")
    lr, n = s.learning_rate, s.max_seq_length
    fail_if(
        lr is not None and not (lr > 0 and math.isfinite(lr)),
        f"--learning-rate must be > 0, got {lr}",
    )
    fail_if(
        n is not None and n > MAX_LEN_LIMIT,
        f"--max-seq-length must be <= {MAX_LEN_LIMIT} "
        f"(TUPE-R keeps a max-len x max-len table), got {n}",
    )
    check_optimizer_flags(s)


def _check_file(flag, path):
    fail_if(not os.path.exists(path), f"{flag}: {path!r}: no such file")
    fail_if(not os.path.isfile(path), f"{flag}: {path!r} is a directory, not a text file")


def check(s):
    """Every flag of ``s`` (a :class:`PretrainSettings`), before anything is read or written: a
    ``UsageError`` naming the first that is wrong; then the first process locks ``--out``."""
    fail_if(not s.data, "--data: give at least one text file")
    for flag, path in [("--data", p) for p in s.data] + [("--eval", s.eval)] * (s.eval is not None):
        _check_file(flag, path)
    _check_ranges(s)
    for a, b, shown in EXCLUSIVE:
        fail_if(
            getattr(s, a) not in (None, False) and getattr(s, b) not in (None, False),
            f"give {shown or _dashed(a)} or {_dashed(b)}, not both",
        )
    if s.config is not None:
        sizes = ("layers", "hidden", "heads", "intermediate", "max_seq_length", "position_mode")
        given = [_dashed(k) for k in sizes if getattr(s, k) is not None]
        fail_if(
            given,
            "give --config or the model size flags, not both (got --config and "
            f"{', '.join(given)})",
        )
    fail_if(s.reshape_schedule and not s.resume, "--reshape-schedule goes with --resume")
    _check_methods(s)
    _check_report_to(s.report_to)
    check_out_dir(s.out)
    device = parse_device(s.device)
    check_backend(s.backend, device)
    fail_if(
        s.fp16 and device.type != "cuda",
        "--fp16 needs --device cuda (use --bf16 or fp32 on the CPU)",
    )
    fail_if(
        s.deepspeed is not None and not os.path.isfile(s.deepspeed),
        f"--deepspeed: no such file {s.deepspeed!r}",
    )
    if int(os.environ.get("RANK", "0")) == 0:  # the first process holds --out (torchrun: rank 0)
        from ..training.pretrain import WRITES

        s.run_folder = RunFolder(s.out, "effbert pretrain", WRITES).lock()


def _check_methods(s):
    """``--grow`` and ``--early-bird`` with the other flags (a resume checks them again once it
    knows the run's own settings)."""
    from ..training.pretrain import METHOD_DEFAULTS, MODEL_DEFAULTS, check_methods

    if s.resume:
        return
    for key in METHOD_DEFAULTS:
        if key.startswith("early_bird_") and getattr(s, key) is not None:
            fail_if(not s.early_bird, f"{_dashed(key)} goes with --early-bird")
    fail_if(
        s.grow_optimizer_state is not None and s.grow is None,
        "--grow-optimizer-state goes with --grow",
    )
    given = {
        k: d if getattr(s, k, None) is None else getattr(s, k) for k, d in MODEL_DEFAULTS.items()
    }
    check_methods(given)


def _check_report_to(names):
    """``--report-to``: ``none``, or integrations transformers knows and finds installed."""
    from transformers import integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if names == ["none"] or not names:
        return
    fail_if("none" in names, "--report-to none goes alone")
    for name in names:
        fail_if(
            name not in INTEGRATION_TO_CALLBACK and name != "all",
            f"--report-to {name}: not "
            f"one of transformers' integrations ({', '.join(sorted(INTEGRATION_TO_CALLBACK))})",
        )
        fail_if(
            name != "all" and name not in integrations.get_available_reporting_integrations(),
            f"--report-to {name}: {name} is not installed here (pip install {name})",
        )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    from ..training.pretrain import run

    check_all = checker("pretrain", build_parser, argv, check)
    return run_command("effbert pretrain", build_parser(), check_all, run, argv)


if __name__ == "__main__":
    sys.exit(main())
