"""``effbert pretrain``: masked-LM pretraining of a TUPE BERT on your own text, with TNF notes for rare words.

    effbert pretrain --data corpus.txt --vocab-size 8000 --out run1 --layers 4 --hidden 256 --heads 4 --steps 10000
    effbert pretrain --data corpus.txt --out run1 --resume          # continue from run1's latest checkpoint
    torchrun --nproc_per_node 8 -m effbert.commands pretrain --data corpus.txt --out run1 ...   # data parallel

The corpus is one sentence or paragraph per line. Each step masks 15% of the word pieces of a batch of lines as
BERT does (80% [MASK], 10% a random piece, 10% unchanged) and trains on the masked-LM loss. With TNF, words whose
corpus count lies in ``[--tnf-min-count, --tnf-max-count]`` (default 100 to 500, the TNF paper's band; the command
says how many fell in it) get a note: the notes are mixed into the input
embeddings where those words occur (unless masked: no peeking at a target) and updated from the encoder output
after each step.

Every random draw is a function of ``(--seed, step, rank)``: which lines a step trains on, the masking, dropout. So
a run that stops and resumes from a checkpoint takes exactly the steps it would have taken without stopping.

``load_pretrained(DIR)`` gives back the model, the tokenizer and the rare-word table.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time

import torch

from . import UsageError, check_backend, check_out_dir, parse_device, run_command

__all__ = ["main", "load_pretrained", "mask_tokens", "progress_bar", "default_backend", "UsageError"]

CONFIG_FILE, VOCAB_FILE, RARE_FILE, RUN_FILE, MODEL_FILE, LOG_FILE = (
    "config.json", "vocab.txt", "rare_words.txt", "pretrain.json", "model.pt", "log.jsonl")
CHECKPOINT_GLOB = "checkpoint-*.pt"
KEEP_CHECKPOINTS = 2
# The longest --max-len: TUPE-R's relative-position bucket table is max_len**2 int64 (8192: 512 MiB), and BERT's is 512
MAX_LEN_LIMIT = 8192




# ------------------------------------------------------------------------------------------ shared with the demo


def mask_tokens(ids, lengths, gen, *, mask_id, maskable, prob=0.15):
    """BERT's masking: ``prob`` of the real maskable pieces become targets; 80% of those become ``mask_id``, 10% a
    random maskable piece, 10% stay. ``maskable``: bool ``[V]`` (False for the special tokens). Returns ``(masked
    ids, labels (-100 = no target), real-token mask)``."""
    n = ids.shape[1]
    real = torch.arange(n)[None] < lengths[:, None]
    words = real & maskable[ids]
    target = words & (torch.rand(ids.shape, generator=gen) < prob)
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    masked = ids.clone()
    masked[target & (r < 0.8)] = mask_id
    rand = target & (r >= 0.8) & (r < 0.9)
    choices = torch.nonzero(maskable).squeeze(1)
    masked[rand] = choices[torch.randint(0, choices.numel(), (int(rand.sum()),), generator=gen)]
    return masked, labels, real


def progress_bar(total, desc, quiet=False, initial=0):
    """A tqdm bar on stdout, or None when tqdm is not installed (callers print periodic lines instead)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, leave=True, disable=quiet, dynamic_ncols=True,
                file=sys.stdout)


def default_backend(device):
    # On the CPU the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, far too slow to train with.
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "eager"
    return "auto"


# ---------------------------------------------------------------------------------------------------- the data


def read_corpus(paths):
    """The non-blank lines of every file, stripped, in order."""
    lines = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"--data: no such file {path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                got = [line.strip() for line in f]
        except UnicodeDecodeError as exc:
            raise UsageError(f"--data: {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        got = [line for line in got if line]
        if not got:
            raise UsageError(f"--data: {path!r} holds no text (every line is blank)")
        lines.extend(got)
    return lines


def rare_words(tokenizer, lines, min_count, max_count):
    """TNF's rare words: the words of the basic split whose count lies in ``[min_count, max_count]``, most frequent
    first. Words without a letter or digit (punctuation) and words the vocabulary cannot cover are left out."""
    import collections

    from ..data.tnf import build_rare_vocab

    counts = collections.Counter()
    for line in lines:
        counts.update(tokenizer.words(line))
    words = build_rare_vocab(counts, min_count, max_count)
    unk = tokenizer.unk_id
    return [w for w in words if any(c.isalnum() for c in w) and unk not in tokenizer.word_ids(w)]


def _derived_seed(seed, what, step, rank=0):
    """An independent seed per (run seed, purpose, step, rank): resuming needs no generator state."""
    digest = hashlib.sha256(f"{seed}/{what}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_rows(step, batch_size, num_lines, seed):
    """The corpus lines of a step: a fresh permutation of the corpus each epoch, ``batch_size`` lines a step."""
    start = step * batch_size
    rows = []
    perms = {}
    for p in range(start, start + batch_size):
        epoch, i = divmod(p, num_lines)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(_derived_seed(seed, "epoch", epoch))
            perms[epoch] = torch.randperm(num_lines, generator=gen)
        rows.append(int(perms[epoch][i]))
    return torch.tensor(rows, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- the command line

# Flags that define the model, its vocabulary and its notes: a resumed run inherits them and must not change them.
MODEL_DEFAULTS = {"layers": 12, "hidden": 768, "heads": 12, "intermediate": None, "max_len": 128,
                  "position_mode": "tupe-r", "dropout": 0.1, "tnf": True, "tnf_min_count": 100,
                  "tnf_max_count": 500, "tnf_window": 16, "tnf_gamma": 0.1, "tnf_lam": 0.5, "cased": False,
                  "seed": 0, "objective": "mlm"}


def build_parser():
    p = argparse.ArgumentParser(prog="effbert pretrain", description=__doc__.splitlines()[0].replace("``", ""))
    d = p.add_argument_group("data and vocabulary")
    d.add_argument("--data", nargs="+", metavar="FILE", help="text files, one sentence or paragraph per line")
    d.add_argument("--vocab", help="a WordPiece vocab.txt (or a folder holding one, as BERT checkpoints ship)")
    d.add_argument("--vocab-size", type=int, help="build a vocabulary of this many pieces from the corpus "
                   "(default 8000 when --vocab is not given)")
    d.add_argument("--cased", action="store_true", default=None, help="keep case and accents (default: lowercase)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder for checkpoints, the log and the model")
    m = p.add_argument_group("model (or --config)")
    m.add_argument("--config", help="a TupeBertConfig JSON file (instead of the size flags)")
    m.add_argument("--layers", type=int, help="encoder layers (default 12)")
    m.add_argument("--hidden", type=int, help="hidden size (default 768)")
    m.add_argument("--heads", type=int, help="attention heads (default 12)")
    m.add_argument("--intermediate", type=int, help="FFN size (default 4 x hidden)")
    m.add_argument("--max-len", type=int, help="longest sequence in pieces, [CLS] and [SEP] included (default 128)")
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
    o = p.add_argument_group("training")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (default 1000)")
    o.add_argument("--batch-size", type=int, default=32, help="lines a step, over all ranks together (default 32)")
    o.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    o.add_argument("--warmup", type=int, default=None, help="linear warm-up steps, then linear decay to 0 "
                   "(default: 10%% of --steps)")
    o.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    o.add_argument("--seed", type=int, default=None, help="default 0")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--backend", default=None, help="effbert op backend (default: auto; eager under the Triton "
                   "interpreter)")
    o.add_argument("--log-every", type=int, default=50, help="print and log the mean loss every N steps (default 50)")
    o.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps, and at the end (default 1000; 0: only at the end)")
    o.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dump-state", help=argparse.SUPPRESS)  # tests: each rank's parameters and notes at the end
    return p


def _fail_if(cond, msg):
    if cond:
        raise UsageError(msg)


def _check_args(a):
    _fail_if(not a.data, "--data: give at least one text file")
    _fail_if(a.steps < 1, f"--steps must be >= 1, got {a.steps}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _fail_if(a.batch_size < world, f"--batch-size must be >= the number of ranks ({world}), got {a.batch_size}")
    _fail_if(not (a.lr > 0 and math.isfinite(a.lr)), f"--lr must be > 0, got {a.lr}")
    _fail_if(a.warmup is not None and a.warmup < 0, f"--warmup must be >= 0, got {a.warmup}")
    _fail_if(not a.weight_decay >= 0, f"--weight-decay must be >= 0, got {a.weight_decay}")
    _fail_if(a.log_every < 1, f"--log-every must be >= 1, got {a.log_every}")
    _fail_if(a.save_every < 0, f"--save-every must be >= 0, got {a.save_every}")
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
    check_backend(a.backend, parse_device(a.device))
    _fail_if(a.tnf_window is not None and a.tnf_window < 0, f"--tnf-window must be >= 0, got {a.tnf_window}")
    for k in ("tnf_gamma", "tnf_lam"):
        v = getattr(a, k)
        _fail_if(v is not None and not 0 <= v <= 1, f"--{k.replace('_', '-')} must be in [0, 1], got {v}")
    _fail_if(a.dropout is not None and not 0 <= a.dropout < 1, f"--dropout must be in [0, 1), got {a.dropout}")


def _model_settings(a, saved=None):
    """The model-defining flags: given ones as given, the rest from the resumed run (``saved``) or the defaults."""
    out = {}
    for k, default in MODEL_DEFAULTS.items():
        v = getattr(a, k)
        if v is None:
            v = saved.get(k, default) if saved is not None else default
        out[k] = v
    if out["tnf_min_count"] > out["tnf_max_count"]:
        raise UsageError(f"--tnf-min-count ({out['tnf_min_count']}) must be <= --tnf-max-count "
                         f"({out['tnf_max_count']})")
    return out


def _build_config(a, s, tokenizer, saved_config=None):
    from ..models import TupeBertConfig

    try:
        if saved_config is not None and a.config is None and not any(
                getattr(a, k) is not None for k in ("layers", "hidden", "heads", "intermediate", "max_len",
                                                    "position_mode", "dropout")):
            values = dict(saved_config)
        elif a.config is not None:
            try:
                with open(a.config, encoding="utf-8") as f:
                    values = json.load(f)
            except FileNotFoundError:
                raise UsageError(f"--config: no such file {a.config!r}") from None
            except json.JSONDecodeError as exc:
                raise UsageError(f"--config: {a.config!r} is not JSON ({exc})") from None
            if not isinstance(values, dict):
                raise UsageError(f"--config: {a.config!r} must hold a JSON object")
            if a.dropout is not None:
                values.update(hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)
        else:
            values = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          intermediate_size=s["intermediate"] or 4 * s["hidden"],
                          max_position_embeddings=s["max_len"], position_mode=s["position_mode"],
                          hidden_dropout_prob=s["dropout"], attention_probs_dropout_prob=s["dropout"])
        for key, want, what in (("vocab_size", len(tokenizer), "the vocabulary's size"),
                                ("pad_token_id", tokenizer.pad_id, "the vocabulary's [PAD] id")):
            if values.get(key, want) != want:
                raise UsageError(f"vocab/config mismatch: the config's {key} is {values[key]} but {what} is "
                                 f"{want}")
            values[key] = want
        values["backend"] = "eager"  # the run's backend is set on the model; the saved config stays portable
        return TupeBertConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{'--config' if a.config else 'model flags'}: {exc}") from None


# --------------------------------------------------------------------------------------------------- checkpoints


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file whole


def _atomic_write(text, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def checkpoints(out_dir):
    """The checkpoint files in ``out_dir``, oldest first."""
    return sorted(glob.glob(os.path.join(out_dir, CHECKPOINT_GLOB)))


def _rng_states():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _save_checkpoint(out_dir, step, model, opt, sched, config, tokenizer, table, run):
    path = os.path.join(out_dir, f"checkpoint-{step:08d}.pt")
    _atomic_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "rng": _rng_states(), "config": config.to_dict(),
                  "vocab": tokenizer.vocab, "rare_words": table.words if table is not None else None,
                  "run": run}, path)
    for old in checkpoints(out_dir)[:-KEEP_CHECKPOINTS]:
        os.remove(old)
    return path


def _load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, tampered or foreign file: say which one
        raise UsageError(f"--resume: cannot read checkpoint {path!r} ({_one_line(exc)})") from None
    keys = ("step", "model", "optimizer", "scheduler", "rng")
    ok = isinstance(ckpt, dict) and all(k in ckpt for k in keys) and isinstance(ckpt["step"], int) \
        and ckpt["step"] >= 0 and isinstance(ckpt["model"], dict)
    _fail_if(not ok, f"--resume: {path!r} is not a checkpoint of effbert pretrain (it lacks some of {keys})")
    return ckpt


def _one_line(exc):
    return " ".join(str(exc).split())[:300]


def read_weights(path, key=None):
    """The tensors of a weights file (``torch.load(..., weights_only=True)``: nothing but tensors and plain
    containers is ever unpickled), or ``file[key]``. A damaged, tampered or foreign file raises ``ValueError``
    naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip errors, UnpicklingError (a forbidden global), EOFError
        raise ValueError(f"cannot read {path!r} ({_one_line(exc)})") from None
    if key is not None:
        state = state.get(key) if isinstance(state, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} holds no state dict of tensors" + (f" under {key!r}" if key else ""))
    return state


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def load_pretrained(path, device=None, backend="auto"):
    """The model an ``effbert pretrain`` run wrote to ``path``: ``(TupeBertForMaskedLM, WordPieceTokenizer,
    RareWordTable or None)``. Reads the final ``model.pt``, or the latest checkpoint when the run has not finished.
    The classification model of ``effbert finetune`` takes the encoder from ``model.bert``."""
    from ..models import TupeBertConfig, TupeBertForMaskedLM
    from ..nn import NoteDictionary
    from ..data.text import WordPieceTokenizer
    from ..data.tnf import RareWordTable

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path must be the folder of an effbert pretrain run, got {path!r}")
    path = os.fspath(path)
    for name in (CONFIG_FILE, VOCAB_FILE, RUN_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"path: {path!r} holds no {name}: not the folder of an effbert pretrain run")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config = TupeBertConfig.from_json(f.read())
    config.backend = backend
    with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    tokenizer = WordPieceTokenizer.from_file(os.path.join(path, VOCAB_FILE), lowercase=not run["settings"]["cased"])
    final = os.path.join(path, MODEL_FILE)
    if os.path.isfile(final):
        state = read_weights(final)
    else:
        ckpts = checkpoints(path)
        if not ckpts:
            raise FileNotFoundError(f"path: {path!r} holds neither {MODEL_FILE} nor a checkpoint")
        state = read_weights(ckpts[-1], "model")
        state = {k: v for k, v in state.items() if not k.startswith("controller.")}  # an MC-BERT run's controller
    table, notes = None, None
    words = _read_lines(os.path.join(path, RARE_FILE)) if run["settings"]["tnf"] else []
    if words:  # a run whose corpus had no word in the rare band trained without notes
        table = RareWordTable.build(words, tokenizer.word_ids, tokenizer.continuation)
        s = run["settings"]
        notes = NoteDictionary(len(table), config.hidden_size, window=s["tnf_window"], gamma=s["tnf_gamma"],
                               lam=s["tnf_lam"])
    model = TupeBertForMaskedLM(config, note_dictionary=notes)
    model.load_state_dict(state)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, table


# ------------------------------------------------------------------------------------------------------ training


class _Dist:
    """The torchrun environment: rank and world size, and the process group when there is more than one rank."""

    def __init__(self, device_arg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg is None:
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available")
            if device.index is None:
                device = torch.device("cuda", self.local_rank if self.world > 1 else torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        self.group = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend)
            self.group = dist.group.WORLD

    @property
    def main(self):
        return self.rank == 0

    def all_sum(self, t):
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t

    def barrier(self):
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self):
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def step_batch(step, ids, lengths, batch_size, seed, tokenizer, maskable, table, shard):
    """A step's training rows: the whole batch is drawn and masked alike on every rank, then each rank keeps its
    ``shard`` (row indices into the batch), cut to its longest row. Returns ``(masked ids, labels, real-token
    mask, lengths, spans, slots)``; spans and slots are None without a rare-word ``table``."""
    rows = batch_rows(step, batch_size, ids.shape[0], seed)
    gen = torch.Generator().manual_seed(_derived_seed(seed, "mask", step))
    b_len = lengths[rows]
    b_ids = ids[rows, : int(b_len.max())]
    masked, labels, real = mask_tokens(b_ids, b_len, gen, mask_id=tokenizer.mask_id, maskable=maskable)
    b_len = b_len[shard]
    n = int(b_len.max())
    masked, labels, real = masked[shard, :n], labels[shard, :n], real[shard, :n]
    spans = slots = None
    if table is not None:
        spans, slots = table.find(masked, b_len)  # masked rare words get no note: no peeking at the target
    return masked, labels, real, b_len, spans, slots


def _param_groups(model, weight_decay):
    # BERT decays matrices and embeddings, not biases, LayerNorm gains or the per-head [CLS] scalars
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _schedule(warmup, total):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _prepare(a, env, log):
    """Everything before the first step: the tokenizer, the data, the rare words, the model, the saved run."""
    from ..data.text import WordPieceTokenizer

    out = a.out
    _fail_if(os.path.exists(out) and not os.path.isdir(out), f"--out: {out!r} exists and is not a folder")
    run_path = os.path.join(out, RUN_FILE)
    saved_run, ckpt = None, None
    env.barrier()  # no rank looks at --out while another could be writing it
    if a.resume:
        if not os.path.isfile(run_path):
            raise UsageError(f"--resume: {out!r} holds no {RUN_FILE}: nothing to resume")
        saved_run = _read_run_file(run_path)
        ckpts = checkpoints(out)
        if ckpts:
            ckpt = _load_checkpoint(ckpts[-1])
            _fail_if(ckpt["step"] > a.steps, f"--steps {a.steps} is below the step the run in {out!r} reached "
                     f"({ckpt['step']}); give --steps >= {ckpt['step']}")
    elif os.path.isfile(run_path):
        raise UsageError(f"--out: {out!r} already holds a run; pass --resume to continue it or choose another "
                         "folder")
    else:
        # never overwrite what another command (or anything else) left there: a fine-tuned model, a config
        others = sorted(n for n in (CONFIG_FILE, VOCAB_FILE, RARE_FILE, MODEL_FILE, LOG_FILE, "finetune.json")
                        if os.path.exists(os.path.join(out, n))) if os.path.isdir(out) else []
        _fail_if(others, f"--out: {out!r} holds {', '.join(others)} but no {RUN_FILE} (not a pretraining run of "
                 "this command): choose another folder")
    s = _model_settings(a, saved_run["settings"] if saved_run else None)
    if saved_run is not None:
        diff = [f"--{k.replace('_', '-')} {saved_run['settings'].get(k, d)!r} -> {s[k]!r}"
                for k, d in MODEL_DEFAULTS.items() if saved_run["settings"].get(k, d) != s[k]]
        if diff:
            raise UsageError("--resume with different model flags than the run in --out: " + "; ".join(diff))
    lines = read_corpus(a.data)
    # the vocabulary: the run's own when resuming, else the given file, else one built from the corpus
    if saved_run is not None:
        tokenizer = _saved_part(out, VOCAB_FILE,
                                lambda p: WordPieceTokenizer.from_file(p, lowercase=not s["cased"]))
        if a.vocab is not None:
            given = _tokenizer_from(a.vocab, s)
            _fail_if(given.vocab != tokenizer.vocab, f"--vocab {a.vocab!r} differs from the vocabulary of the run "
                     f"in {out!r}")
        # the size asked for at the start, which a corpus may not fill; a run that recorded none: at least its size
        asked = saved_run.get("vocab_size")
        if a.vocab_size is not None and asked is not None:
            _fail_if(a.vocab_size != asked, f"--vocab-size {a.vocab_size} differs from the run's --vocab-size {asked}")
        elif a.vocab_size is not None:
            _fail_if(a.vocab_size < len(tokenizer), f"--vocab-size {a.vocab_size} differs from the run's vocabulary "
                     f"({len(tokenizer)} pieces)")
    elif a.vocab is not None:
        tokenizer = _tokenizer_from(a.vocab, s)
    else:
        size = a.vocab_size or 8000
        log(f"building a {size}-piece WordPiece vocabulary from {len(lines)} lines")
        try:
            tokenizer = WordPieceTokenizer.build(lines, size, lowercase=not s["cased"])
        except ValueError as exc:
            raise UsageError(f"--vocab-size: {exc}") from None
    config = _build_config(a, s, tokenizer, saved_run["config"] if saved_run else None)
    if saved_run is not None:
        want = dict(saved_run["config"], backend="eager")
        now = json.loads(config.to_json())  # as run.json holds it (JSON object keys are strings: id2label's too)
        diff = [f"{k} {want.get(k)!r} -> {v!r}" for k, v in now.items() if want.get(k) != v]
        _fail_if(diff, "--resume with a different model config than the run in --out: " + "; ".join(diff))
    # record the sizes the model really has (a --config run's flags were not the source), so a resume can check them
    s.update(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
             intermediate=config.intermediate_size, max_len=config.max_position_embeddings,
             position_mode=config.position_mode, dropout=config.hidden_dropout_prob)
    table = None
    if s["tnf"]:
        from ..data.tnf import RareWordTable

        if saved_run is not None:
            words = _saved_part(out, RARE_FILE, _read_lines)
        else:
            words = rare_words(tokenizer, lines, s["tnf_min_count"], s["tnf_max_count"])
        if words:
            table = RareWordTable.build(words, tokenizer.word_ids, tokenizer.continuation)
        elif saved_run is None:
            log(f"no word of the corpus occurs {s['tnf_min_count']} to {s['tnf_max_count']} times: training without "
                "TNF notes (lower --tnf-min-count or raise --tnf-max-count for some)")
    run = {"settings": s, "config": config.to_dict()}
    if saved_run is not None:
        run["vocab_size"] = saved_run.get("vocab_size")
    elif a.vocab is None:
        run["vocab_size"] = a.vocab_size or 8000
    return lines, tokenizer, config, table, run, ckpt


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
        _atomic_write("".join(keep), path)


def _read_run_file(path):
    """``pretrain.json`` of a run to resume: its settings and config, or a one-line error when it is damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--resume: cannot read {path!r} ({exc}); the run folder is damaged") from None
    ok = isinstance(run, dict) and isinstance(run.get("settings"), dict) and isinstance(run.get("config"), dict)
    _fail_if(not ok or any(k not in run["settings"] for k in MODEL_DEFAULTS),
             f"--resume: {path!r} is not the run file of effbert pretrain (settings or config missing)")
    return run


def _saved_part(out, name, read):
    """``read(path)`` of a file of the run in ``out``; a missing or unreadable one is a one-line error."""
    path = os.path.join(out, name)
    try:
        return read(path)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise UsageError(f"--resume: cannot read {path!r} ({exc}); the run folder is damaged or incomplete") \
            from None


def _tokenizer_from(path, s):
    from ..data.text import WordPieceTokenizer

    try:
        return WordPieceTokenizer.from_file(path, lowercase=not s["cased"])
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--vocab: {exc}") from None


def train(a, log):
    from ..models import TupeBertForMaskedLM
    from ..nn import NoteDictionary

    env = _Dist(a.device)
    try:
        return _train(a, env, log, TupeBertForMaskedLM, NoteDictionary)
    finally:
        env.close()


def _train(a, env, log, TupeBertForMaskedLM, NoteDictionary):
    log = log if env.main else (lambda *_: None)  # only rank 0 prints
    device = env.device
    backend = a.backend or default_backend(device)
    check_backend(backend, device)
    lines, tokenizer, config, table, run, ckpt = _prepare(a, env, log)
    s = run["settings"]
    out = a.out

    ids, lengths = tokenizer.encode_batch(lines, config.max_position_embeddings)
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
                                                      mask_token_id=tokenizer.mask_id)
        else:
            model = TupeBertForMaskedLM(config, note_dictionary=notes)
        model.set_backend(backend)
        model = model.to(device).train()
    except ValueError as exc:
        raise UsageError(f"--backend: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises RuntimeError, CUDA's a subclass
        if not isinstance(exc, MemoryError) and not any(w in str(exc).lower() for w in ("alloc", "out of memory")):
            raise
        raise UsageError(f"the model does not fit in memory on {device} ({_one_line(exc)}); lower --max-len, "
                         "--hidden or --layers") from None
    opt = torch.optim.AdamW(_param_groups(model, a.weight_decay), lr=a.lr)
    warmup = a.warmup if a.warmup is not None else a.steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup, a.steps))
    start = 0
    if ckpt is not None:
        path = checkpoints(out)[-1]
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if "cuda" in ckpt["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise UsageError(f"--resume: checkpoint {path!r} does not fit the run in {out!r} "
                             f"({_one_line(exc)})") from None
        _fail_if(not all(bool(torch.isfinite(p).all()) for p in model.parameters()),
                 f"--resume: checkpoint {path!r} holds non-finite weights")
        start = ckpt["step"]
        # --lr and --weight-decay may change on resume: the schedule continues from the new peak
        sched.base_lrs = [a.lr for _ in opt.param_groups]
        for group in opt.param_groups:
            group["initial_lr"], group["lr"] = a.lr, a.lr * _schedule(warmup, a.steps)(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        opt.param_groups[0]["weight_decay"] = a.weight_decay  # group 1 (biases, norms) is never decayed
        log(f"resuming from step {start} ({path})")
    if env.main:
        os.makedirs(out, exist_ok=True)
        if ckpt is None:  # a fresh run (or a resumed one that never reached its first checkpoint)
            _atomic_write(config.to_json() + "\n", os.path.join(out, CONFIG_FILE))
            tokenizer.save(os.path.join(out, VOCAB_FILE))
            if s["tnf"]:
                words = table.words if table is not None else []
                _atomic_write("".join(w + "\n" for w in words), os.path.join(out, RARE_FILE))
            _atomic_write(json.dumps(run, indent=2, sort_keys=True) + "\n", os.path.join(out, RUN_FILE))
        _truncate_log(os.path.join(out, LOG_FILE), start)
    env.barrier()  # every rank sees the run files before any rank could fail on them
    ddp = model
    if env.group is not None:
        from torch.nn.parallel import DistributedDataParallel

        # the notes are kept identical by the ordered update, not by broadcasting rank 0's buffers
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"pretraining a {config.num_hidden_layers}-layer {config.position_mode} BERT (hidden {config.hidden_size}, "
        f"{config.num_attention_heads} heads, {n_params / 1e6:.2f}M parameters) on {len(lines)} lines, "
        f"{len(tokenizer)} pieces, "
        + (f"TNF notes for {len(table)} rare words (the words seen {s['tnf_min_count']} to {s['tnf_max_count']} "
           "times in the corpus), " if table is not None else "no TNF, ")
        + f"{a.steps} steps of {a.batch_size} lines on {env.world} x {device}, backend {backend}"
        + (f", objective MC-BERT (K = {model.num_candidates}, lambda = {model.loss_lambda:g}, controller hidden "
           f"{model.controller_config.hidden_size})" if mcbert else ""))

    maskable = torch.ones(len(tokenizer), dtype=torch.bool)
    maskable[[tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]] = False
    shard_of = torch.tensor_split(torch.arange(a.batch_size), env.world)[env.rank]
    bar = (progress_bar(a.steps, "MC-BERT" if mcbert else "MLM", a.quiet or not env.main, initial=start)
           if env.main else None)
    window, mc_window, t0 = [], [], time.perf_counter()
    for step in range(start, a.steps):
        masked, labels, real, b_len, spans, slots = step_batch(step, ids, lengths, a.batch_size, s["seed"],
                                                               tokenizer, maskable, table, shard_of)
        torch.manual_seed(_derived_seed(s["seed"], "dropout", step, env.rank))
        slots = slots.to(device) if slots is not None else None
        dev_len = b_len.to(device)
        # the head at the masked positions only: the same loss, without the [B, N, vocab] logits
        if mcbert:  # the objective's logic lives in the model; its losses are means over each rank's tokens
            out_ = ddp(masked.to(device), real.to(device), labels=labels.to(device), note_slots=slots)
            parts = torch.stack([out_.loss.detach(), out_.mlm_loss, out_.mc_loss, out_.mc_accuracy,
                                 out_.mc_replaced_accuracy, out_.replaced_fraction]).double()
            totals = env.all_sum(parts) / env.world
            loss, total_targets = out_.loss, 1.0
        else:
            out_ = ddp(masked.to(device), real.to(device), labels=labels.to(device), note_slots=slots,
                       return_logits=False)
            # the loss of the whole batch: every rank's target count, so a rank's share weighs by its targets
            local = (labels != -100).sum()
            totals = env.all_sum(torch.stack([out_.loss.detach().double().cpu() * local,
                                              local.double()]).to(device))
            total_targets = max(1.0, float(totals[1]))
            loss = out_.loss * (float(local) / total_targets) * env.world  # DDP averages gradients over ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if table is not None:
            model.update_notes(out_.last_hidden_state, spans.to(device), dev_len, process_group=env.group)
        batch_loss = float(totals[0]) / total_targets
        if not math.isfinite(batch_loss):  # every rank sees the same total, so every rank stops here
            raise UsageError(f"the loss is {batch_loss} at step {step + 1}: stopping (lower --lr); the checkpoints in "
                             f"{os.path.abspath(out)} are the last good ones, resume from them with --resume")
        window.append(batch_loss)
        if mcbert:
            mc_window.append([float(t) for t in totals[1:]])
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.3f}")
        if done % a.log_every == 0 or done == a.steps:
            if env.main:
                record = {"step": done, "loss": sum(window) / len(window), "lr": sched.get_last_lr()[0],
                          "seconds": round(time.perf_counter() - t0, 3)}
                if table is not None:
                    record["notes_taken"] = int((model.notes.counts > 0).sum())
                if mcbert:
                    for i, key in enumerate(("mlm_loss", "mc_loss", "mc_accuracy", "mc_replaced_accuracy",
                                             "replaced_fraction")):
                        record[key] = sum(w[i] for w in mc_window) / len(mc_window)
                with open(os.path.join(out, LOG_FILE), "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                line = f"  step {done:7d}  loss {record['loss']:.4f}  lr {record['lr']:.3g}"
                if mcbert:
                    line += (f"  mlm {record['mlm_loss']:.4f}  multi-choice {record['mc_loss']:.4f}  "
                             f"acc {record['mc_accuracy']:.3f} (replaced {record['mc_replaced_accuracy']:.3f}, "
                             f"{100 * record['replaced_fraction']:.1f}% of tokens)")
                if bar is not None and not a.quiet:
                    bar.write(line, file=sys.stdout)  # above the bar, not through it
                else:
                    log(line)
            window, mc_window = [], []
        if done == a.steps or (a.save_every and done % a.save_every == 0):
            # a finite loss can still leave non-finite weights: they never replace a good checkpoint
            finite = torch.stack([torch.isfinite(t).all() for t in model.state_dict().values()
                                  if t.is_floating_point()]).all()  # the weights and the notes
            _fail_if(not bool(finite), f"non-finite weights after step {done}: stopping (lower --lr); the "
                     f"checkpoints in {os.path.abspath(out)} are the last good ones")
            if env.main:
                _save_checkpoint(out, done, model, opt, sched, config, tokenizer, table, run)
    if bar is not None:
        bar.close()
    if env.main:
        # MC-BERT's controller is dropped: model.pt holds what fine-tuning loads (TupeBertForMaskedLM's keys)
        _atomic_save(model.finetuning_state_dict() if mcbert else model.state_dict(), os.path.join(out, MODEL_FILE))
        log(f"done: {a.steps} steps, model in {os.path.abspath(out)} (load it with "
            f"effbert.commands.pretrain.load_pretrained)")
    if a.dump_state:
        path = a.dump_state if env.world == 1 else f"{a.dump_state}.rank{env.rank}"
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
    env.barrier()
    return model


def main(argv=None):
    return run_command("effbert pretrain", build_parser(), _check_args, train, argv)


if __name__ == "__main__":
    sys.exit(main())
