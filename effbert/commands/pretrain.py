"""``effbert pretrain``: masked-LM pretraining of a TUPE BERT on your own text, with TNF notes for rare words.

    effbert pretrain --data corpus.txt --vocab-size 8000 --out run1 --layers 4 --hidden 256 --heads 4 --steps 10000
    effbert pretrain --data corpus.txt --out run1 --resume          # continue from run1's newest complete checkpoint
    torchrun --nproc_per_node 8 -m effbert.commands pretrain --data corpus.txt --out run1 ...   # data parallel

A thin command over ``transformers.Trainer`` (``effbert.training.PretrainingTrainer``): the tokenizer is trained
with ``tokenizers`` (or loaded), the corpus read, tokenized and cached by ``datasets`` (``effbert.data.corpus``:
one sentence or paragraph a line, a blank line between documents, texts of up to ``--max-len`` pieces), and
batches made by ``effbert.data.collator.DataCollatorForTupeMLM`` (BERT's 80/10/10 masking of 15% of the pieces, or
with ``--objective mcbert`` MC-BERT's published masking, every target [MASK]; TNF's rare-word spans). With TNF, words whose corpus count lies in ``[--tnf-min-count, --tnf-max-count]`` (default
100 to 500, the TNF paper's band; the command says how many fell in it) get a note, mixed into the input embeddings
where those words occur (unless masked) and updated from the encoder output after each backward pass.

Mixed precision, gradient accumulation, checkpoints (``save_pretrained`` folders with the tokenizer), resuming,
torchrun DDP, FSDP and DeepSpeed are Trainer's own. ``load_pretrained(DIR)`` gives back the model, the tokenizer and
the rare-word table; ``AutoModelForMaskedLM.from_pretrained(DIR)`` (after ``import effbert``) loads the model.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

from . import UsageError, check_backend, check_out_dir, parse_device, run_command
from .recipes import check_optimizer_flags, checker
from ..training.run_folder import (MODEL_FILES, RunFolder, atomic_write, check_same_data, checkpoint_max_steps, checkpoints,
                         fingerprint, newest_complete, schedule_line, with_schedule)

__all__ = ["main", "load_pretrained", "checkpoints", "default_backend", "UsageError"]

RUN_FILE, RARE_FILE, LOG_FILE, REPORT_FILE, PLOT_FILE = (
    "pretrain.json", "rare_words.txt", "log.jsonl", "report.json", "loss.png")
KEEP_CHECKPOINTS = 2
# The longest --max-len: TUPE-R's relative-position bucket table is max_len**2 int64 (8192: 512 MiB), and BERT's is 512
MAX_LEN_LIMIT = 8192
# What a finished or running pretraining folder holds besides the run file: never overwritten by a fresh run
OWN_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", RARE_FILE, LOG_FILE, REPORT_FILE,
             "model.pt", "finetune.json")
# What a run writes at the top of --out (the tokenizer's files are save_pretrained's): anything else is not ours
WRITES = (RUN_FILE, RARE_FILE, LOG_FILE, REPORT_FILE, PLOT_FILE, "config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "checkpoint-*")


def default_backend(device):
    # On the CPU the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, far too slow to train with.
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "eager"
    return "auto"


# ---------------------------------------------------------------------------------------------- the command line

# Flags that define the model, its vocabulary, its notes and the data: a resumed run inherits them and must not
# change them. The training flags Trainer restores from a checkpoint (optimizer, schedule) must not change either.
MODEL_DEFAULTS = {"layers": 12, "hidden": 768, "heads": 12, "intermediate": None, "max_len": 128,
                  "position_mode": "tupe-r", "dropout": 0.1, "tnf": True, "tnf_min_count": 100,
                  "tnf_max_count": 500, "tnf_window": 16, "tnf_gamma": 0.1, "tnf_lam": 0.5, "cased": False,
                  "seed": 0, "objective": "mlm", "pack": True, "mask_replace_prob": None, "random_replace_prob": None}
# The share of masked targets that become [MASK] / a random piece, per objective: BERT's 80/10/10 for mlm; MC-BERT's
# published task (github.com/MC-BERT/MC-BERT, MaskTokensDataset2) masks every target with [MASK]
MASKING_DEFAULTS = {"mlm": (0.8, 0.1), "mcbert": (1.0, 0.0)}
# settings a run file of an older version may lack, and what that version did: BERT's 80/10/10 for every objective
OPTIONAL_SETTINGS = {"mask_replace_prob": 0.8, "random_replace_prob": 0.1}
TRAINING_DEFAULTS = {"batch_size": 32, "grad_accum": 1, "lr": 1e-4, "warmup": None, "weight_decay": 0.01,
                     # Trainer's own defaults (and what runs before these flags existed used); --recipe names a preset
                     "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "recipe": None}


def build_parser():
    p = argparse.ArgumentParser(prog="effbert pretrain", description=__doc__.splitlines()[0].replace("``", ""))
    d = p.add_argument_group("data and vocabulary")
    d.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, one sentence or paragraph per line, "
                   "a blank line between documents")
    d.add_argument("--vocab", help="a tokenizer: tokenizer.json, a WordPiece vocab.txt, or a folder holding one (as "
                   "BERT checkpoints ship)")
    d.add_argument("--vocab-size", type=int, help="train a WordPiece vocabulary of at most this many pieces on the "
                   "corpus with the tokenizers library (default 8000 when --vocab is not given)")
    d.add_argument("--cased", action="store_true", default=None, help="keep case and accents (default: lowercase)")
    d.add_argument("--pack", dest="pack", action="store_true", default=None,
                   help="several texts a row, attention kept within each text (the default when the model takes "
                   "position_ids)")
    d.add_argument("--no-pack", dest="pack", action="store_false", help="one text a row")
    d.add_argument("--mask-replace-prob", type=float, help="the share of the 15%% masked targets replaced by [MASK] "
                   "(default 0.8 with --objective mlm, BERT's; 1 with mcbert, MC-BERT's published task)")
    d.add_argument("--random-replace-prob", type=float, help="the share replaced by a random piece (default 0.1 with "
                   "mlm, 0 with mcbert); the rest keep their piece (--mask-replace-prob 0.8 --random-replace-prob "
                   "0.1 gives BERT's 80/10/10 for mcbert too)")
    d.add_argument("--num-proc", type=int, default=None, help="processes that tokenize the corpus (default 1)")
    d.add_argument("--cache-dir", default=None, help="where datasets caches the tokenized corpus (default: its own, "
                   "~/.cache/huggingface/datasets)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder for checkpoints, the log and the model")
    m = p.add_argument_group("model (or --config)")
    m.add_argument("--config", help="a TupeBertConfig JSON file (instead of the size flags)")
    m.add_argument("--layers", type=int, help="encoder layers (default 12)")
    m.add_argument("--hidden", type=int, help="hidden size (default 768)")
    m.add_argument("--heads", type=int, help="attention heads (default 12)")
    m.add_argument("--intermediate", type=int, help="FFN size (default 4 x hidden)")
    m.add_argument("--max-len", type=int, help="longest row in pieces, [CLS] and [SEP] included (default 128)")
    m.add_argument("--position-mode", choices=("absolute", "tupe-a", "tupe-r"), help="default tupe-r")
    m.add_argument("--dropout", type=float, help="hidden and attention dropout (default 0.1)")
    m.add_argument("--objective", choices=("mlm", "mcbert"), help="mlm (default) or mcbert: MC-BERT's "
                   "multi-choice cloze test with a meta controller (effbert.models.TupeBertForMultiChoicePretraining)")
    t = p.add_argument_group("TNF (notes for rare words)")
    t.add_argument("--tnf", dest="tnf", action="store_true", default=None, help="take notes (the default)")
    t.add_argument("--no-tnf", dest="tnf", action="store_false")
    t.add_argument("--tnf-min-count", type=int, help="a rare word occurs at least this often (default 100, the "
                   "TNF paper's band)")
    t.add_argument("--tnf-max-count", type=int, help="... and at most this often (default 500, the TNF paper's "
                   "band)")
    t.add_argument("--tnf-window", type=int, help="tokens on each side of a rare word averaged into its note "
                   "(default 16)")
    t.add_argument("--tnf-gamma", type=float, help="note update rate (default 0.1)")
    t.add_argument("--tnf-lam", type=float, help="weight of the note in the input embedding (default 0.5)")
    o = p.add_argument_group("training (transformers.TrainingArguments)")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (default 1000)")
    o.add_argument("--batch-size", type=int, help="rows an optimizer step, over all ranks and accumulation steps "
                   "together (default 32)")
    o.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    o.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 1e-4)")
    o.add_argument("--warmup", type=int, help="linear warm-up steps, then linear decay to 0 (default: 10%% of --steps)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    o.add_argument("--adam-beta1", type=float, help="AdamW beta1 (default 0.9)")
    o.add_argument("--adam-beta2", type=float, help="AdamW beta2 (default 0.999)")
    o.add_argument("--adam-epsilon", type=float, help="AdamW epsilon (default 1e-8)")
    o.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this (default 1; 0: no clipping)")
    o.add_argument("--recipe", help="a paper's published settings for the flags not given: tupe, mcbert or tnf "
                   "(docs/pretrain.md lists each value and its source)")
    mp = o.add_mutually_exclusive_group()
    mp.add_argument("--fp16", action="store_true", help="fp16 mixed precision (Trainer's; needs a GPU)")
    mp.add_argument("--bf16", action="store_true", help="bf16 mixed precision (Trainer's; default fp32)")
    o.add_argument("--fsdp", default=None, help="Trainer's --fsdp option string, e.g. 'full_shard auto_wrap'")
    o.add_argument("--deepspeed", default=None, metavar="JSON", help="a DeepSpeed config file (Trainer's switch)")
    o.add_argument("--seed", type=int, default=None, help="default 0")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--backend", default=None, help="effbert op backend (default: auto; eager under the Triton "
                   "interpreter)")
    o.add_argument("--log-every", type=int, default=50, help="print and log the mean loss every N steps (default 50)")
    o.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps, and at the end "
                   "(default 1000; 0: no checkpoints, only the final model)")
    o.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    o.add_argument("--reshape-schedule", action="store_true", help="with --resume and another --steps: stretch the "
                   "learning-rate schedule to the new --steps (default: keep the run's, which ends at the --steps it "
                   "started with)")
    o.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a "
                   "terminal)")
    p.add_argument("--dump-state", help=argparse.SUPPRESS)  # tests: each rank's parameters and notes at the end
    return p


def _fail_if(cond, msg):
    if cond:
        raise UsageError(msg)


def _world():
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_args(a):
    _fail_if(not a.data, "--data: give at least one text file")
    _fail_if(a.steps < 1, f"--steps must be >= 1, got {a.steps}")
    _fail_if(a.batch_size is not None and a.batch_size < 1, f"--batch-size must be >= 1, got {a.batch_size}")
    _fail_if(a.grad_accum is not None and a.grad_accum < 1, f"--grad-accum must be >= 1, got {a.grad_accum}")
    _fail_if(a.lr is not None and not (a.lr > 0 and math.isfinite(a.lr)), f"--lr must be > 0, got {a.lr}")
    _fail_if(a.warmup is not None and a.warmup < 0, f"--warmup must be >= 0, got {a.warmup}")
    _fail_if(a.weight_decay is not None and not a.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {a.weight_decay}")
    check_optimizer_flags(a)
    _fail_if(a.log_every < 1, f"--log-every must be >= 1, got {a.log_every}")
    _fail_if(a.save_every < 0, f"--save-every must be >= 0, got {a.save_every}")
    _fail_if(a.num_proc is not None and a.num_proc < 1, f"--num-proc must be >= 1, got {a.num_proc}")
    _fail_if(a.vocab is not None and a.vocab_size is not None, "give --vocab or --vocab-size, not both")
    _fail_if(a.vocab_size is not None and a.vocab_size < 6, f"--vocab-size must be >= 6, got {a.vocab_size}")
    sizes = ("layers", "hidden", "heads", "intermediate", "max_len", "position_mode", "dropout")
    if a.config is not None:
        given = [f"--{k.replace('_', '-')}" for k in sizes if getattr(a, k) is not None and k != "dropout"]
        _fail_if(given, f"give --config or the model size flags, not both (got --config and {', '.join(given)})")
    for k in ("layers", "hidden", "heads", "intermediate", "tnf_min_count", "tnf_max_count"):
        v = getattr(a, k)
        _fail_if(v is not None and v < 1, f"--{k.replace('_', '-')} must be >= 1, got {v}")
    _fail_if(a.max_len is not None and a.max_len < 3, f"--max-len must be >= 3, got {a.max_len}")
    _fail_if(a.max_len is not None and a.max_len > MAX_LEN_LIMIT,
             f"--max-len must be <= {MAX_LEN_LIMIT} (TUPE-R keeps a max-len x max-len table), got {a.max_len}")
    check_out_dir(a.out)
    device = parse_device(a.device)
    check_backend(a.backend, device)
    _fail_if(a.fp16 and device.type != "cuda", "--fp16 needs --device cuda (use --bf16 or fp32 on the CPU)")
    _fail_if(a.deepspeed is not None and not os.path.isfile(a.deepspeed), f"--deepspeed: no such file {a.deepspeed!r}")
    _fail_if(a.tnf_window is not None and a.tnf_window < 0, f"--tnf-window must be >= 0, got {a.tnf_window}")
    for k in ("tnf_gamma", "tnf_lam"):
        v = getattr(a, k)
        _fail_if(v is not None and not 0 <= v <= 1, f"--{k.replace('_', '-')} must be in [0, 1], got {v}")
    _fail_if(a.dropout is not None and not 0 <= a.dropout < 1, f"--dropout must be in [0, 1), got {a.dropout}")
    for k in ("mask_replace_prob", "random_replace_prob"):
        v = getattr(a, k)
        _fail_if(v is not None and not 0 <= v <= 1, f"--{k.replace('_', '-')} must be in [0, 1], got {v}")
    _fail_if(a.reshape_schedule and not a.resume, "--reshape-schedule goes with --resume")
    if int(os.environ.get("RANK", "0")) == 0:  # the first process holds --out for the whole run (torchrun: rank 0)
        a.run_folder = RunFolder(a.out, "effbert pretrain", WRITES).lock()


def _settings(a, defaults, saved=None):
    """Flags as given, the rest from the resumed run (``saved``) or the defaults."""
    out = {}
    for k, default in defaults.items():
        v = getattr(a, k)
        if v is None:
            v = saved.get(k, default) if saved is not None else default
        out[k] = v
    return out


def _build_config(a, s, tokenizer, saved_config=None):
    from ..models import TupeBertConfig

    try:
        if saved_config is not None:
            values = dict(saved_config)
        elif a.config is not None:
            try:
                with open(a.config, encoding="utf-8") as f:
                    values = json.load(f)
            except FileNotFoundError:
                raise UsageError(f"--config: no such file {a.config!r}") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UsageError(f"--config: {a.config!r} is not JSON ({_one_line(exc)})") from None
            if not isinstance(values, dict):
                raise UsageError(f"--config: {a.config!r} must hold a JSON object")
            values.pop("model_type", None)
            values.pop("architectures", None)
            values.pop("transformers_version", None)
            if a.dropout is not None:
                values.update(hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)
        else:
            values = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          intermediate_size=s["intermediate"] or 4 * s["hidden"],
                          max_position_embeddings=s["max_len"], position_mode=s["position_mode"],
                          hidden_dropout_prob=s["dropout"], attention_probs_dropout_prob=s["dropout"],
                          type_vocab_size=0)
        if saved_config is None:
            for key, want, what in (("vocab_size", len(tokenizer), "the vocabulary's size"),
                                    ("pad_token_id", tokenizer.pad_token_id, "the vocabulary's [PAD] id")):
                if values.get(key, want) != want:
                    raise UsageError(f"vocab/config mismatch: the config's {key} is {values[key]} but {what} is "
                                     f"{want}")
                values[key] = want
        values["backend"] = "eager"  # the run's backend is set on the model; the saved config stays portable
        return TupeBertConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{'--config' if a.config else 'model flags'}: {exc}") from None


def _one_line(exc):
    return " ".join(str(exc).split())[:300]


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


# ------------------------------------------------------------------------------------------- loading the result


def _check_model_folder(path, what):
    """``path`` holds a tupe-bert ``config.json``: else a ``ValueError`` naming the file and what it holds."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"{what}: {path!r} holds no config.json (not a save_pretrained folder)")
    try:
        with open(cfg, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what}: cannot read {cfg!r} ({_one_line(exc)})") from None
    kind = values.get("model_type") if isinstance(values, dict) else None
    if kind != "tupe-bert":
        raise ValueError(f"{what}: {cfg!r} is a model of type {kind!r}, not 'tupe-bert' (effbert's TUPE BERT)")
    return values


def load_pretrained(path, device=None, backend="auto"):
    """The model an ``effbert pretrain`` run wrote to ``path``: ``(TupeBertForMaskedLM, BertTokenizerFast,
    RareWordTable or None)``, in eval mode. Reads the final model (``model.safetensors``), or the latest checkpoint
    when the run has not finished (an MC-BERT checkpoint's controller is left out). The classification model of
    ``effbert finetune`` takes the encoder from ``model.bert``. Raises ``FileNotFoundError`` for a folder that is
    not a pretraining run and ``ValueError`` for a model of another type or damaged files."""
    from ..data.corpus import rare_word_table
    from ..data.tokenization import load_tokenizer
    from ..models import TupeBertForMaskedLM

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path must be the folder of an effbert pretrain run, got {path!r}")
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, RUN_FILE)):
        raise FileNotFoundError(f"path: {path!r} holds no {RUN_FILE}: not the folder of an effbert pretrain run")
    with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    where = path
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        where = newest_complete(path, need=MODEL_FILES)
        if where is None:
            raise FileNotFoundError(f"path: {path!r} holds neither model.safetensors nor a complete checkpoint")
    _check_model_folder(where, "path")
    tokenizer = load_tokenizer(path, lowercase=not run["settings"]["cased"])
    try:
        model = TupeBertForMaskedLM.from_pretrained(where, backend=backend)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"path: cannot load the model in {where!r} ({_one_line(exc)})") from None
    table = None
    rare = os.path.join(path, RARE_FILE)
    words = _read_lines(rare) if os.path.isfile(rare) else []
    if words and model.notes is not None:  # a run whose corpus had no word in the rare band trained without notes
        table = rare_word_table(words, tokenizer)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, table


# ------------------------------------------------------------------------------------------------------ the run


def _read_run_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--resume: cannot read {path!r} ({_one_line(exc)}); the run folder is damaged") from None
    ok = isinstance(run, dict) and isinstance(run.get("settings"), dict) and isinstance(run.get("config"), dict) \
        and isinstance(run.get("training"), dict)
    _fail_if(not ok or any(k not in run["settings"] for k in MODEL_DEFAULTS if k not in OPTIONAL_SETTINGS),
             f"--resume: {path!r} is not the run file of effbert pretrain (settings, training or config missing)")
    return run


def _truncate_log(path, step):
    """Drop the records after ``step`` from ``log.jsonl``: a resumed run logs those steps again."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the crash
    if len(keep) != len(lines):
        atomic_write("".join(keep), path)


def _checkpoint_step(path):
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as f:
            step = json.load(f)["global_step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume: cannot read {state!r} ({_one_line(exc)}); the checkpoint is damaged") from None
    _fail_if(not isinstance(step, int) or step < 0, f"--resume: {state!r} holds no step")
    return step


def _check_checkpoint(path, model):
    """The checkpoint's model is a tupe-bert whose tensors have the run's names and shapes and are finite."""
    from safetensors import safe_open

    try:
        _check_model_folder(path, "--resume")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    weights = os.path.join(path, "model.safetensors")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(weights, framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            bad = [k for k in got if k in want and not bool(torch.isfinite(f.get_tensor(k)).all())
                   and f.get_tensor(k).is_floating_point()]
    except Exception as exc:  # safetensors' own errors for a truncated or foreign file
        raise UsageError(f"--resume: cannot read {weights!r} ({_one_line(exc)})") from None
    diff = sorted(set(want) ^ set(got)) + sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    if diff:
        raise UsageError(f"--resume: {weights!r} does not fit the run ({len(diff)} tensors differ, e.g. "
                         f"{diff[0]!r})")
    if bad:
        raise UsageError(f"--resume: {weights!r} holds non-finite weights ({bad[0]})")


class _Dist:
    """torchrun's ranks, for the preparation before Trainer: rank 0 decides, the others receive its result."""

    def __init__(self):
        self.world, self.rank = _world(), int(os.environ.get("RANK", "0"))

    @property
    def main(self):
        return self.rank == 0

    @property
    def on(self):
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def share(self, fn):
        """``fn()`` on rank 0, its result (or its UsageError) on every rank."""
        if not self.on:
            return fn()
        box = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UsageError as exc:
                box[0] = ("error", str(exc))
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UsageError(value)
        return value

    def barrier(self):
        if self.on:
            torch.distributed.barrier()


def _prepare_out(a, log):
    """The run to resume (its run file and newest complete checkpoint), or None for a fresh run; refuses a folder
    that holds another run, another command's files or the user's."""
    out = a.out
    run_path = os.path.join(out, RUN_FILE)
    if a.resume:
        _fail_if(not os.path.isfile(run_path), f"--resume: {out!r} holds no {RUN_FILE}: nothing to resume")
        saved = _read_run_file(run_path)
        RunFolder(out, "effbert pretrain", WRITES).refuse_foreign()
        check_same_data("--data", saved.get("data"), a.data, out)
        return saved, newest_complete(out, log)
    _fail_if(os.path.isfile(run_path), f"--out: {out!r} already holds a run; pass --resume to continue it or choose "
             "another folder")
    if os.path.isdir(out):
        others = sorted(n for n in OWN_FILES if os.path.exists(os.path.join(out, n)))
        others += [os.path.basename(p) for p in checkpoints(out)]
        _fail_if(others, f"--out: {out!r} holds {', '.join(others)} but no {RUN_FILE} (not a pretraining run of "
                 "this command): choose another folder")
        RunFolder(out, "effbert pretrain", WRITES).refuse_foreign()
    return None, None


def _tokenizer(a, s, saved, out):
    from ..data.tokenization import load_tokenizer, train_wordpiece

    if saved is not None:
        try:
            tok = load_tokenizer(out, lowercase=not s["cased"])
        except ValueError as exc:
            raise UsageError(f"--resume: {exc}; the run folder is damaged or incomplete") from None
        if a.vocab is not None:
            given = _tokenizer_from(a.vocab, s)
            _fail_if(given.get_vocab() != tok.get_vocab(), f"--vocab {a.vocab!r} differs from the vocabulary of "
                     f"the run in {out!r}")
        asked = saved.get("vocab_size")
        _fail_if(a.vocab_size is not None and asked is not None and a.vocab_size != asked,
                 f"--vocab-size {a.vocab_size} differs from the run's --vocab-size {asked}")
        return tok
    if a.vocab is not None:
        return _tokenizer_from(a.vocab, s)
    try:
        return train_wordpiece(a.data, vocab_size=a.vocab_size or 8000, lowercase=not s["cased"])
    except ValueError as exc:
        raise UsageError(f"--data: {exc}") from None


def _tokenizer_from(path, s):
    from ..data.tokenization import load_tokenizer

    try:
        return load_tokenizer(path, lowercase=not s["cased"])
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--vocab: {exc}") from None


def _tokenizer_files(tok):
    """The files of ``tok.save_pretrained``, as bytes (what rank 0 sends the other ranks)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {}
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
    return files


def _tokenizer_of_files(files):
    import tempfile

    from ..data.tokenization import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        return load_tokenizer(tmp)


def _model_takes_position_ids(objective):
    """Whether the objective's model takes packed rows (``position_ids`` restarting at each text)."""
    import inspect

    if objective == "mcbert":
        from ..models.mc_bert import TupeBertForMultiChoicePretraining as cls
    else:
        from ..models.tupe_bert import TupeBertForMaskedLM as cls
    return "position_ids" in inspect.signature(cls.forward).parameters


def _stderr_is_terminal():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _RunLog:
    """Trainer callback (rank 0): every logged step becomes a record of ``log.jsonl`` and one printed line."""

    def __init__(self, out, mcbert, t0):
        self.out, self.mcbert, self.t0 = out, mcbert, t0
        self.records = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step is logged whatever --log-every is (every rank logs together)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                  "seconds": round(time.perf_counter() - self.t0, 3)}
        from ..training import MC_METRICS

        for key in ("grad_norm", "notes_taken") + MC_METRICS:
            if key in logs:
                record[key] = logs[key]
        self.records.append(record)
        with open(os.path.join(self.out, LOG_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        line = f"  step {record['step']:7d}  loss {record['loss']:.4f}  lr {record['lr']:.3g}"
        if self.mcbert and "mc_loss" in record:
            line += (f"  mlm {record['mlm_loss']:.4f}  multi-choice {record['mc_loss']:.4f}  "
                     f"acc {record['mc_accuracy']:.3f} (replaced {record['mc_replaced_accuracy']:.3f}, "
                     f"{100 * record['replaced_fraction']:.1f}% of tokens; cloze {record['mc_choice_accuracy']:.3f}"
                     f", chance {record['mc_choice_chance']:.3f})")
        bar = getattr(self, "bar", None)
        if bar is not None and bar.training_bar is not None:
            bar.training_bar.write(line, file=sys.stdout)  # above the bar, not through it
        else:
            print(line, flush=True)
        return control


def _callbacks(out, mcbert, t0, show_bar):
    from transformers import ProgressCallback, TrainerCallback

    class RunLog(_RunLog, TrainerCallback):
        pass

    class Bar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return control  # RunLog prints the records above the bar

    log = RunLog(out, mcbert, t0)
    bar = Bar() if show_bar else None
    log.bar = bar
    return log, bar


def _schedule(a, tr, saved, ckpt):
    """The learning-rate schedule, ``{"steps", "warmup"}``: a fresh run's from --steps and --warmup; a resumed
    run's as it started (the run file's; a run file of an older version: the checkpoint's max_steps), so that a
    longer --steps does not re-shape it, unless --reshape-schedule stretches it to the new --steps."""
    if saved is None or a.reshape_schedule:
        return {"steps": a.steps, "warmup": tr["warmup"] if tr["warmup"] is not None else a.steps // 10}
    if saved.get("schedule"):
        return dict(saved["schedule"])
    steps = (checkpoint_max_steps(ckpt) if ckpt is not None else None) or a.steps
    return {"steps": steps, "warmup": tr["warmup"] if tr["warmup"] is not None else steps // 10}


def train(a, log):
    env = _Dist()
    try:
        return _train(a, env, log)
    finally:
        if env.on:
            torch.distributed.destroy_process_group()


def _train(a, env, log):
    import datasets
    import transformers
    from transformers import PrinterCallback, ProgressCallback, TrainingArguments

    from ..data.collator import DataCollatorForTupeMLM
    from ..data.corpus import count_words, load_corpus, rare_word_table, rare_words
    from ..models import TupeBertForMaskedLM
    from ..nn import NoteDictionary
    from ..training import NonFiniteError, PretrainingTrainer

    log = log if env.main else (lambda *_: None)  # only rank 0 prints
    device = parse_device(a.device)
    backend = a.backend or default_backend(device)
    show_bar = env.main and not a.quiet and _stderr_is_terminal()
    if not show_bar:  # a log file gets the periodic lines, never a bar's carriage returns
        import huggingface_hub.utils

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    out = a.out
    _fail_if(os.path.exists(out) and not os.path.isdir(out), f"--out: {out!r} exists and is not a folder")

    # every rank reads the same run files (nothing writes them before the barrier below)
    saved, ckpt = _prepare_out(a, log)
    if saved is not None:
        saved["settings"] = {**OPTIONAL_SETTINGS, **saved["settings"]}
    s = _settings(a, MODEL_DEFAULTS, saved["settings"] if saved else None)
    tr = _settings(a, TRAINING_DEFAULTS, saved["training"] if saved else None)
    per_device, rem = divmod(tr["batch_size"], env.world * tr["grad_accum"])
    _fail_if(rem or per_device < 1, f"--batch-size ({tr['batch_size']}) must be a multiple of the ranks x "
             f"--grad-accum ({env.world} x {tr['grad_accum']})")
    schedule = _schedule(a, tr, saved, ckpt)
    precision = "fp16" if a.fp16 else "bf16" if a.bf16 else "fp32"
    # under torchrun, TrainingArguments starts the process group the preparation below uses
    args = TrainingArguments(
        output_dir=out, max_steps=a.steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=tr["grad_accum"], learning_rate=tr["lr"], weight_decay=tr["weight_decay"],
        warmup_steps=schedule["warmup"], lr_scheduler_type="linear", max_grad_norm=tr["max_grad_norm"], optim="adamw_torch",
        adam_beta1=tr["adam_beta1"], adam_beta2=tr["adam_beta2"], adam_epsilon=tr["adam_epsilon"],
        logging_strategy="steps", logging_steps=a.log_every, logging_first_step=False,
        save_strategy="steps" if a.save_every else "no", save_steps=a.save_every or 1,
        save_total_limit=KEEP_CHECKPOINTS, seed=s["seed"], data_seed=s["seed"], fp16=precision == "fp16",
        bf16=precision == "bf16", use_cpu=device.type == "cpu", report_to=[], disable_tqdm=not show_bar,
        ddp_broadcast_buffers=False, ddp_find_unused_parameters=False, dataloader_num_workers=0,
        remove_unused_columns=False, logging_nan_inf_filter=False, fsdp=a.fsdp or "", deepspeed=a.deepspeed,
        average_tokens_across_devices=True)
    if saved is not None:
        diff = [f"--{k.replace('_', '-')} {saved['settings'].get(k, d)!r} -> {s[k]!r}"
                for k, d in MODEL_DEFAULTS.items() if saved["settings"].get(k, d) != s[k]]
        diff += [f"--{k.replace('_', '-')} {saved['training'].get(k, d)!r} -> {tr[k]!r}"
                 for k, d in TRAINING_DEFAULTS.items() if saved["training"].get(k, d) != tr[k]]
        _fail_if(diff, "--resume with different flags than the run in --out: " + "; ".join(diff))
    masking = MASKING_DEFAULTS[s["objective"]]
    for i, k in enumerate(OPTIONAL_SETTINGS):  # a new run: the objective's shares (the run file records them)
        s[k] = masking[i] if s[k] is None else float(s[k])
    _fail_if(s["mask_replace_prob"] + s["random_replace_prob"] > 1, f"--mask-replace-prob ({s['mask_replace_prob']}) "
             f"+ --random-replace-prob ({s['random_replace_prob']}) must be <= 1")
    _fail_if(s["tnf_min_count"] > s["tnf_max_count"], f"--tnf-min-count ({s['tnf_min_count']}) must be <= "
             f"--tnf-max-count ({s['tnf_max_count']})")
    start = _checkpoint_step(ckpt) if ckpt is not None else 0
    _fail_if(start > a.steps, f"--steps {a.steps} is below the step the run in {out!r} reached ({start}); give "
             f"--steps >= {start}")

    # the tokenizer: the run's own when resuming, else the given one, else trained on the corpus (by rank 0)
    if env.world > 1:
        tokenizer = _tokenizer_of_files(env.share(lambda: _tokenizer_files(_tokenizer(a, s, saved, out))))
    else:
        if saved is None and a.vocab is None:
            log(f"training a {a.vocab_size or 8000}-piece WordPiece vocabulary on {len(a.data)} file(s)")
        tokenizer = _tokenizer(a, s, saved, out)
    config = _build_config(a, s, tokenizer, saved["config"] if saved else None)
    max_len = config.max_position_embeddings
    takes_positions = _model_takes_position_ids(s["objective"])
    _fail_if(a.pack is True and not takes_positions, f"--pack: the {s['objective']} model of this version takes no "
             "position_ids, so it cannot keep packed texts apart (give --no-pack)")
    pack = s["pack"] = bool(s["pack"] and takes_positions)  # the run file records what the run did

    # the corpus: checked, tokenized and cached by rank 0 first; the other ranks then read its cache
    def corpus():
        try:
            return load_corpus(a.data, tokenizer, max_len, num_proc=a.num_proc, cache_dir=a.cache_dir,
                               seed=s["seed"])
        except ValueError as exc:
            raise UsageError(f"--data: {exc}") from None

    if env.world > 1:
        env.share(lambda: len(corpus()))
    texts = corpus()
    table = None
    if s["tnf"]:
        if saved is not None:
            try:
                words = _read_lines(os.path.join(out, RARE_FILE))
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--resume: cannot read {os.path.join(out, RARE_FILE)!r} ({_one_line(exc)}); the "
                                 "run folder is damaged or incomplete") from None
        else:
            words = env.share(lambda: rare_words(count_words(texts, tokenizer), tokenizer, s["tnf_min_count"],
                                                 s["tnf_max_count"]))
        table = rare_word_table(words, tokenizer) if words else None
        if table is None and saved is None:
            log(f"no word of the corpus occurs {s['tnf_min_count']} to {s['tnf_max_count']} times: training without "
                "TNF notes (lower --tnf-min-count or raise --tnf-max-count for some)")
    fill = None
    if pack:
        from ..data.packing import pack as pack_texts

        if env.world > 1:  # rank 0 writes the packed cache; the other ranks then read it
            env.share(lambda: pack_texts(texts, max_len, num_proc=a.num_proc).rows)
        packed = pack_texts(texts, max_len, num_proc=a.num_proc)
        dataset, fill = packed.dataset, (packed.fill_rate, packed.unpacked_fill_rate)
    else:
        dataset = texts

    torch.manual_seed(s["seed"])  # the initial weights
    notes = None
    if table is not None:
        notes = NoteDictionary(len(table), config.hidden_size, window=s["tnf_window"], gamma=s["tnf_gamma"],
                               lam=s["tnf_lam"])
    mcbert = s["objective"] == "mcbert"
    try:  # the model exists before any file is written: a size that does not fit leaves no half-made run
        if mcbert:
            from ..models import TupeBertForMultiChoicePretraining

            model = TupeBertForMultiChoicePretraining(config, note_dictionary=notes,
                                                      mask_token_id=tokenizer.mask_token_id)
        else:
            model = TupeBertForMaskedLM(config, note_dictionary=notes)
        model.set_backend(backend)
    except ValueError as exc:
        raise UsageError(f"--backend: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises RuntimeError, CUDA's a subclass
        if not isinstance(exc, MemoryError) and not any(w in str(exc).lower() for w in ("alloc", "out of memory")):
            raise
        raise UsageError(f"the model does not fit in memory on {device} ({_one_line(exc)}); lower --max-len, "
                         "--hidden or --layers") from None
    if ckpt is not None:
        _check_checkpoint(ckpt, model)
        log(f"resuming from step {start} ({ckpt})")
    if saved is not None:
        log(schedule_line((saved.get("schedule") or schedule)["steps"], a.steps, a.reshape_schedule,
                          schedule["warmup"]))

    run = {"settings": s, "training": tr, "config": json.loads(config.to_json()), "schedule": schedule}
    run["vocab_size"] = saved.get("vocab_size") if saved else (None if a.vocab else a.vocab_size or 8000)
    # what a resume checks it is given again (run_folder.fingerprint: size and the ends' SHA-256)
    run["data"] = saved.get("data") if saved else [fingerprint(f) for f in a.data]
    if env.main:
        os.makedirs(out, exist_ok=True)
        if saved is not None and a.reshape_schedule:  # later resumes keep the reshaped schedule
            atomic_write(json.dumps({**saved, "schedule": schedule}, indent=2, sort_keys=True) + "\n",
                         os.path.join(out, RUN_FILE))
        if saved is None:
            tokenizer.save_pretrained(out)
            if s["tnf"]:
                atomic_write("".join(w + "\n" for w in (table.words if table is not None else [])),
                              os.path.join(out, RARE_FILE))
            atomic_write(json.dumps(run, indent=2, sort_keys=True) + "\n", os.path.join(out, RUN_FILE))
        _truncate_log(os.path.join(out, LOG_FILE), start)
    env.barrier()

    collator = DataCollatorForTupeMLM(tokenizer, rare_words=table, seed=s["seed"],
                                      mask_replace_prob=s["mask_replace_prob"],
                                      random_replace_prob=s["random_replace_prob"])
    collator.step = start * tr["grad_accum"]  # the masks continue where the checkpoint left them
    t0 = time.perf_counter()
    run_log, bar = _callbacks(out, mcbert, t0, show_bar)
    trainer = with_schedule(PretrainingTrainer, schedule["steps"])(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                 processing_class=tokenizer, callbacks=[run_log])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if bar is not None:
        trainer.add_callback(bar)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretraining a {config.num_hidden_layers}-layer {config.position_mode} BERT (hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, {n_params / 1e6:.2f}M parameters) on {len(texts)} texts of up to "
        f"{max_len} pieces, {len(tokenizer)} pieces, "
        + (f"TNF notes for {len(table)} rare words (the words seen {s['tnf_min_count']} to {s['tnf_max_count']} "
           "times in the corpus), " if table is not None else "no TNF, ")
        + f"{a.steps} steps of {tr['batch_size']} rows on {env.world} x {device}, backend {backend}"
        + (f", packed {len(dataset)} rows (fill {100 * fill[0]:.1f}%, {100 * fill[1]:.1f}% unpacked)" if fill
           else "")
        + (f", precision {precision}" if precision != "fp32" else "")
        + (f", objective MC-BERT (K = {model.num_candidates}, lambda = {model.loss_lambda:g}, controller hidden "
           f"{model.controller_config.hidden_size})" if mcbert else ""))
    folder = getattr(a, "run_folder", None)  # held by the first process
    try:
        if folder is not None:
            folder.step = start
            result = folder.train(trainer, ckpt)  # a full disk during a save: one line naming the intact checkpoint
        else:
            result = trainer.train(resume_from_checkpoint=ckpt)
    except NonFiniteError as exc:
        raise UsageError(f"{exc}: stopping (lower --lr); the checkpoints in {os.path.abspath(out)} are the last "
                         "good ones, resume from them with --resume") from None
    from ..training.trainers import _all_finite

    _fail_if(not _all_finite(model), f"non-finite weights after step {a.steps}: stopping (lower --lr); the "
             f"checkpoints in {os.path.abspath(out)} are the last good ones")
    if env.main:
        _save_final(model, mcbert, tokenizer, out)
        _report(out, run_log.records, result, start, a.steps, fill, table)
        log(f"done: {a.steps} steps in {time.perf_counter() - t0:.1f} s, model in {os.path.abspath(out)} (load it "
            "with effbert.commands.pretrain.load_pretrained or AutoModelForMaskedLM.from_pretrained)")
    if a.dump_state:
        path = a.dump_state if env.world == 1 else f"{a.dump_state}.rank{env.rank}"
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    env.barrier()
    return model


def _save_final(model, mcbert, tokenizer, out):
    """``save_pretrained`` of the masked-LM model (MC-BERT's controller dropped) and the tokenizer in ``out``."""
    from ..models import TupeBertForMaskedLM

    final = model
    if mcbert:
        final = TupeBertForMaskedLM(model.config, note_dictionary=model.notes)
        final.load_state_dict(model.finetuning_state_dict())
    final.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _report(out, records, result, start, steps, fill, table):
    """``report.json`` (the run in numbers) and ``loss.png`` (the loss curve, when matplotlib is installed)."""
    every = [json.loads(x) for x in _read_lines(os.path.join(out, LOG_FILE)) if x.strip()] \
        if os.path.isfile(os.path.join(out, LOG_FILE)) else records
    report = {"steps": steps, "resumed_from": start, "seconds": round(result.metrics.get("train_runtime", 0.0), 3),
              "first_loss": every[0]["loss"] if every else None, "last_loss": every[-1]["loss"] if every else None,
              "rare_words": len(table) if table is not None else 0,
              "notes_taken": every[-1].get("notes_taken") if every else None}
    if fill:
        report.update(fill_rate=fill[0], unpacked_fill_rate=fill[1])
    from ..training import MC_METRICS

    for key in MC_METRICS:
        if every and key in every[-1]:
            report[key] = every[-1][key]
    atomic_write(json.dumps(report, indent=2) + "\n", os.path.join(out, REPORT_FILE))
    if len(every) < 2:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in every], [r["loss"] for r in every], ".-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("effbert pretrain")
    fig.tight_layout()
    fig.savefig(os.path.join(out, PLOT_FILE), dpi=100)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("effbert pretrain", build_parser(), checker("pretrain", build_parser, argv, _check_args),
                       train, argv)


if __name__ == "__main__":
    sys.exit(main())
