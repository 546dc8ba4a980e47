"""``effbert pretrain``'s run, step by step: :func:`run` reads top to bottom (the run folder, the
settings, the tokenizer, the data, the model, ``TrainingArguments``, the trainer, training, the
final model, the report), and each step is a function a test can call.

``settings`` is ``effbert.commands.pretrain.PretrainSettings`` (or any object with its fields). The
run folder (``--out``) holds the run file ``pretrain.json`` (the settings a resume must keep, the
config, the learning-rate schedule, the data's fingerprints), the tokenizer, ``rare_words.txt``
(TNF), ``log.jsonl``, ``report.json``, ``loss.png``, the final ``save_pretrained`` model and
Trainer's ``checkpoints/checkpoint-N``; with ``--grow``, ``growth.jsonl`` (CompoundGrow's growths,
``effbert.training.growth``); with ``--early-bird``, ``early_bird.json`` (EarlyBERT's search and
ticket, ``effbert.training.early_bird``).
"""

import json
import os
import time
from collections import namedtuple

import torch

from ..models.loading import CHECKPOINT_DIR, RARE_FILE, RUN_FILE, check_model_folder, read_lines
from .progress import RunLog, perplexity, quiet_libraries
from .run_folder import (
    RunFolder,
    UsageError,
    default_backend,
    fail_if,
    one_line,
    parse_device,
    stderr_is_terminal,
    atomic_write,
    check_same_data,
    checkpoint_max_steps,
    checkpoints,
    fingerprint,
    make_readable,
    newest_complete,
    schedule_line,
    with_schedule,
)

__all__ = ["run", "WRITES", "MODEL_DEFAULTS", "TRAINING_DEFAULTS"]

LOG_FILE, REPORT_FILE, PLOT_FILE = "log.jsonl", "report.json", "loss.png"
GROWTH_FILE, EARLY_BIRD_FILE = "growth.jsonl", "early_bird.json"  # --grow's and --early-bird's
# What a finished or running pretraining folder holds besides the run file: never overwritten by a
# fresh run
OWN_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.txt",
    RARE_FILE,
    LOG_FILE,
    REPORT_FILE,
    "finetune.json",
    GROWTH_FILE,
    EARLY_BIRD_FILE,
)
# What a run writes at the top of --out (the tokenizer's files are save_pretrained's); anything else
# is not ours (checkpoint-*: the checkpoints of runs of earlier versions)
WRITES = (
    RUN_FILE,
    RARE_FILE,
    LOG_FILE,
    REPORT_FILE,
    PLOT_FILE,
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    CHECKPOINT_DIR,
    "checkpoint-*",
    GROWTH_FILE,
    EARLY_BIRD_FILE,
)
# Settings that define the model, its vocabulary, its notes and the data: a resumed run inherits
# them and must not change them. Nor the training settings Trainer restores from a checkpoint.
MODEL_DEFAULTS = {
    "layers": 12,
    "hidden": 768,
    "heads": 12,
    "intermediate": None,
    "max_seq_length": 128,
    "position_mode": "tupe-r",
    "dropout": 0.1,
    "tnf": True,
    "tnf_min_count": 100,
    "tnf_max_count": 500,
    "tnf_window": 16,
    "tnf_gamma": 0.1,
    "tnf_lam": 0.5,
    "cased": False,
    "seed": 0,
    "objective": "mlm",
    "pack": True,
    "mask_replace_prob": None,
    "random_replace_prob": None,
}
# CompoundGrow (--grow) and EarlyBERT (--early-bird): kept by a resume like the model's settings;
# a run file of an older version lacks them (it ran neither)
METHOD_DEFAULTS = {
    "grow": None,
    "grow_optimizer_state": "fresh",
    "early_bird": False,
    "early_bird_search_steps": 0,
    "early_bird_l1": 1e-4,
    "early_bird_head_ratio": 0.333333,
    "early_bird_ffn_ratio": 0.4,
    "early_bird_draw_every": 10,
    "early_bird_threshold": 0.1,
    "early_bird_patience": 5,
}
MODEL_DEFAULTS.update(METHOD_DEFAULTS)
# Trainer's own defaults for the optimizer (what runs before these flags existed used)
TRAINING_DEFAULTS = {
    "batch_size": 32,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "warmup_steps": None,
    "warmup_ratio": None,
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "recipe": None,
}
# The run files of earlier versions spelled these settings as their flags were then spelled
OLD_KEYS = {
    "max_len": "max_seq_length",
    "grad_accum": "gradient_accumulation_steps",
    "lr": "learning_rate",
    "warmup": "warmup_steps",
}
# The share of masked targets made [MASK] / a random piece, per objective: BERT's 80/10/10 for
# mlm; MC-BERT's published task (github.com/MC-BERT/MC-BERT, MaskTokensDataset2) masks every
# target with [MASK]
MASKING_DEFAULTS = {"mlm": (0.8, 0.1), "mcbert": (1.0, 0.0)}
# what a run file of an older version may lack, and what that version did: 80/10/10 everywhere
OPTIONAL_SETTINGS = {"mask_replace_prob": 0.8, "random_replace_prob": 0.1}
# The data of a run: the training texts and rows, the packing's fill rates (None: unpacked), TNF's
# rare-word table (None: no notes) and the held-out texts (None: no --eval)
Data = namedtuple("Data", "texts rows fill table held_out")


def _flag(key):
    return f"--{key.replace('_', '-')}"


class Dist:
    """torchrun's ranks, for the preparation before Trainer: rank 0 decides, the others receive its
    result."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))

    @property
    def main(self):
        return self.rank == 0

    @property
    def on(self):
        dist = torch.distributed
        return self.world > 1 and dist.is_available() and dist.is_initialized()

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


# ---------------------------------------------------------------------------------- the run folder


def read_run_file(path):
    """The run file at ``path`` (older spellings of its keys renamed), or a ``UsageError``: damaged,
    or another command's."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(
            f"--resume: cannot read {path!r} ({one_line(exc, 300)}); the run folder is damaged"
        ) from None
    ok = isinstance(run, dict) and all(
        isinstance(run.get(k), dict) for k in ("settings", "config", "training")
    )
    if ok:
        for part in ("settings", "training"):
            run[part] = {OLD_KEYS.get(k, k): v for k, v in run[part].items()}
        run["settings"] = {**OPTIONAL_SETTINGS, **METHOD_DEFAULTS, **run["settings"]}
    fail_if(
        not ok or any(k not in run["settings"] for k in MODEL_DEFAULTS),
        f"--resume: {path!r} "
        "is not the run file of effbert pretrain (settings, training or config missing)",
    )
    return run


def prepare_out(settings, folder, log):
    """The run to resume (its run file and newest complete checkpoint), or ``(None, None)`` for a
    fresh run; refuses a folder that holds another run, another command's files or the user's.
    ``folder``: the ``RunFolder`` of ``--out``."""
    out = settings.out
    fail_if(
        os.path.exists(out) and not os.path.isdir(out), f"--out: {out!r} exists and is not a folder"
    )
    run_path = os.path.join(out, RUN_FILE)
    if settings.resume:
        fail_if(
            not os.path.isfile(run_path),
            f"--resume: {out!r} holds no {RUN_FILE}: nothing to resume",
        )
        saved = read_run_file(run_path)
        folder.refuse_foreign()
        check_same_data("--data", saved.get("data"), settings.data, out)
        # a run of an earlier version kept its checkpoints at the top of the folder
        return saved, newest_complete(folder.checkpoint_root, log) or newest_complete(out, log)
    fail_if(
        os.path.isfile(run_path),
        f"--out: {out!r} already holds a run; pass --resume to "
        "continue it or choose another folder",
    )
    if os.path.isdir(out):
        others = sorted(n for n in OWN_FILES if os.path.exists(os.path.join(out, n)))
        others += [
            os.path.basename(p) for p in checkpoints(out) + checkpoints(folder.checkpoint_root)
        ]
        fail_if(
            others,
            f"--out: {out!r} holds {', '.join(others)} but no {RUN_FILE} (not a "
            "pretraining run of this command): choose another folder",
        )
        folder.refuse_foreign()
    return None, None


def truncate_log(path, step):
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


def checkpoint_step(path):
    """The optimizer step a checkpoint holds (Trainer's ``trainer_state.json``); 0 for None."""
    if path is None:
        return 0
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as f:
            step = json.load(f)["global_step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--resume: cannot read {state!r} ({one_line(exc, 300)}); the checkpoint is damaged"
        ) from None
    fail_if(not isinstance(step, int) or step < 0, f"--resume: {state!r} holds no step")
    return step


def check_checkpoint(path, model):
    """The checkpoint's model is a tupe-bert whose tensors have the run's names and shapes and are
    finite; else a ``UsageError`` naming the file."""
    from safetensors import safe_open

    try:
        check_model_folder(path, "--resume")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    weights = os.path.join(path, "model.safetensors")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(weights, framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            bad = [
                k
                for k in got
                if k in want
                and f.get_tensor(k).is_floating_point()
                and not bool(torch.isfinite(f.get_tensor(k)).all())
            ]
    except Exception as exc:  # safetensors' own errors for a truncated or foreign file
        raise UsageError(f"--resume: cannot read {weights!r} ({one_line(exc, 300)})") from None
    diff = sorted(set(want) ^ set(got))
    diff += sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    if diff:
        raise UsageError(
            f"--resume: {weights!r} does not fit the run ({len(diff)} tensors "
            f"differ, e.g. {diff[0]!r})"
        )
    if bad:
        raise UsageError(f"--resume: {weights!r} holds non-finite weights ({bad[0]})")


# ------------------------------------------------------------------------------------ the settings


def resolve(settings, saved, world):
    """``(model, training)``: the settings that define the run, as dicts of ``MODEL_DEFAULTS``' and
    ``TRAINING_DEFAULTS``' keys: given, else the resumed run's (``saved``), else the defaults. A
    resume that changes any of them is a ``UsageError`` naming each change."""
    values = []
    for defaults, part in ((MODEL_DEFAULTS, "settings"), (TRAINING_DEFAULTS, "training")):
        kept = saved[part] if saved is not None else {}
        values.append(
            {
                k: kept.get(k, d) if getattr(settings, k, None) is None else getattr(settings, k)
                for k, d in defaults.items()
            }
        )
    s, tr = values
    if settings.per_device_train_batch_size is not None:  # the global batch it makes
        tr["batch_size"] = (
            settings.per_device_train_batch_size * world * tr["gradient_accumulation_steps"]
        )
    if saved is not None:
        diff = [
            f"{_flag(k)} {saved[part].get(k, d)!r} -> {now[k]!r}"
            for part, defaults, now in (
                ("settings", MODEL_DEFAULTS, s),
                ("training", TRAINING_DEFAULTS, tr),
            )
            for k, d in defaults.items()
            if saved[part].get(k, d) != now[k]
        ]
        fail_if(diff, "--resume with different flags than the run in --out: " + "; ".join(diff))
    masking = MASKING_DEFAULTS[s["objective"]]
    for i, k in enumerate(OPTIONAL_SETTINGS):  # a new run: the objective's (the run file has them)
        s[k] = masking[i] if s[k] is None else float(s[k])
    fail_if(
        s["mask_replace_prob"] + s["random_replace_prob"] > 1,
        "--mask-replace-prob "
        f"({s['mask_replace_prob']}) + --random-replace-prob ({s['random_replace_prob']}) "
        "must be <= 1",
    )
    fail_if(
        s["tnf_min_count"] > s["tnf_max_count"],
        f"--tnf-min-count ({s['tnf_min_count']}) must be <= --tnf-max-count ({s['tnf_max_count']})",
    )
    check_methods(s)
    return s, tr


def check_methods(s):
    """``--grow`` and ``--early-bird`` against the run's other settings (``s``: a dict of
    ``MODEL_DEFAULTS``' keys); returns the parsed ``GrowthSchedule`` (None without ``--grow``).
    Each refusal is a one-line ``UsageError``."""
    from .growth import GrowthSchedule

    if s["grow"] is None:
        return None
    fail_if(s["early_bird"], "--early-bird and --grow exclude each other: give one")
    fail_if(
        s["objective"] == "mcbert", "--grow grows the masked-LM model: not with --objective mcbert"
    )
    try:
        schedule = GrowthSchedule.parse(s["grow"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--grow: {exc}") from None
    if "pool" in schedule.sizes_at(0):
        fail_if(
            s["pack"],
            "--grow pool=...: the pooled stage runs one text a row, so it cannot "
            "pack (add --no-pack)",
        )
        fail_if(s["tnf"], "--grow pool=...: the pooled stage takes no TNF notes (add --no-tnf)")
    return schedule


def per_device_batch(tr, world):
    """Rows a micro-batch on each device: the global batch over the ranks and accumulation steps."""
    accum = tr["gradient_accumulation_steps"]
    per_device, rem = divmod(tr["batch_size"], world * accum)
    fail_if(
        rem or per_device < 1,
        f"--batch-size ({tr['batch_size']}) must be a multiple of the "
        f"ranks x --gradient-accumulation-steps ({world} x {accum})",
    )
    return per_device


def warmup_of(tr, steps):
    """Warm-up steps: ``--warmup-steps``, else ``floor(--warmup-ratio x steps)`` (default 0.1)."""
    if tr["warmup_steps"] is not None:
        return int(tr["warmup_steps"])
    if tr["warmup_ratio"] is None:
        return steps // 10
    return int(tr["warmup_ratio"] * steps + 1e-9)


def learning_rate_schedule(settings, tr, saved, ckpt):
    """The learning-rate schedule, ``{"steps", "warmup"}``: a fresh run's from ``--max-steps`` and
    the warm-up; a resumed run's as it started (the run file's; a run file of an older version: the
    checkpoint's max_steps), so that a longer ``--max-steps`` does not re-shape it, unless
    ``--reshape-schedule`` stretches it."""
    if saved is None or settings.reshape_schedule:
        return {"steps": settings.max_steps, "warmup": warmup_of(tr, settings.max_steps)}
    if saved.get("schedule"):
        return dict(saved["schedule"])
    steps = (checkpoint_max_steps(ckpt) if ckpt is not None else None) or settings.max_steps
    return {"steps": steps, "warmup": warmup_of(tr, steps)}


# --------------------------------------------------------------------- the tokenizer and the config


def tokenizer_for(settings, s, saved):
    """The run's own tokenizer when resuming (``--vocab`` must match it), else ``--vocab``, else a
    WordPiece vocabulary trained on ``--data``."""
    from ..data.tokenization import load_tokenizer, train_wordpiece

    def given(path):
        try:
            return load_tokenizer(path, lowercase=not s["cased"])
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--vocab: {exc}") from None

    if saved is not None:
        try:
            tok = load_tokenizer(settings.out, lowercase=not s["cased"])
        except ValueError as exc:
            raise UsageError(f"--resume: {exc}; the run folder is damaged or incomplete") from None
        fail_if(
            settings.vocab is not None and given(settings.vocab).get_vocab() != tok.get_vocab(),
            f"--vocab {settings.vocab!r} differs from the vocabulary of the run in "
            f"{settings.out!r}",
        )
        asked, size = saved.get("vocab_size"), settings.vocab_size
        fail_if(
            size is not None and asked is not None and size != asked,
            f"--vocab-size {size} differs from the run's --vocab-size {asked}",
        )
        return tok
    if settings.vocab is not None:
        return given(settings.vocab)
    try:
        return train_wordpiece(
            settings.data, vocab_size=settings.vocab_size or 8000, lowercase=not s["cased"]
        )
    except ValueError as exc:
        raise UsageError(f"--data: {exc}") from None


def tokenizer_of_run(settings, s, saved, env, log):
    """:func:`tokenizer_for` on rank 0; the other ranks load the files it saves."""
    import tempfile

    from ..data.tokenization import load_tokenizer

    if saved is None and settings.vocab is None:
        log(
            f"training a {settings.vocab_size or 8000}-piece WordPiece vocabulary on "
            f"{len(settings.data)} file(s)"
        )
    if env.world == 1:
        return tokenizer_for(settings, s, saved)

    def files():
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_for(settings, s, saved).save_pretrained(tmp)
            return {n: open(os.path.join(tmp, n), "rb").read() for n in os.listdir(tmp)}

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in env.share(files).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        return load_tokenizer(tmp)


def _config_file(path, dropout):
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config: no such file {path!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--config: {path!r} is not JSON ({one_line(exc, 300)})") from None
    fail_if(not isinstance(values, dict), f"--config: {path!r} must hold a JSON object")
    for key in ("model_type", "architectures", "transformers_version"):
        values.pop(key, None)
    if dropout is not None:
        values.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return values


def build_config(settings, s, tokenizer, saved_config=None):
    """The ``TupeBertConfig``: the resumed run's, ``--config``'s, or the size flags'; its vocabulary
    the tokenizer's."""
    from ..models import TupeBertConfig

    try:
        if saved_config is not None:
            values = dict(saved_config)
        elif settings.config is not None:
            values = _config_file(settings.config, settings.dropout)
        else:
            values = dict(
                hidden_size=s["hidden"],
                num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"],
                intermediate_size=s["intermediate"] or 4 * s["hidden"],
                max_position_embeddings=s["max_seq_length"],
                position_mode=s["position_mode"],
                hidden_dropout_prob=s["dropout"],
                attention_probs_dropout_prob=s["dropout"],
                type_vocab_size=0,
            )
        if saved_config is None:
            for key, want, what in (
                ("vocab_size", len(tokenizer), "the vocabulary's size"),
                ("pad_token_id", tokenizer.pad_token_id, "the vocabulary's [PAD] id"),
            ):
                fail_if(
                    values.get(key, want) != want,
                    f"vocab/config mismatch: the config's {key} "
                    f"is {values.get(key)} but {what} is {want}",
                )
                values[key] = want
        values["backend"] = "eager"  # the run's backend is the model's; the config stays portable
        return TupeBertConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{'--config' if settings.config else 'model flags'}: {exc}") from None


def packs(settings, s):
    """Whether the run packs several texts a row: asked (the default) and the objective's model
    takes ``position_ids`` restarting at each text (``--pack`` given for one that does not: an
    error)."""
    import inspect

    if s["objective"] == "mcbert":
        from ..models.mc_bert import TupeBertForMultiChoicePretraining as cls
    else:
        from ..models.tupe_bert import TupeBertForMaskedLM as cls
    takes = "position_ids" in inspect.signature(cls.forward).parameters
    fail_if(
        settings.pack is True and not takes,
        f"--pack: the {s['objective']} model of this "
        "version takes no position_ids, so it cannot keep packed texts apart (give --no-pack)",
    )
    return bool(s["pack"] and takes)


# ---------------------------------------------------------------------------------------- the data


def load_texts(flag, files, tokenizer, max_len, settings, env):
    """``files`` tokenized (``effbert.data.corpus.load_corpus``) by rank 0 first; the other ranks
    read its cache. A problem with a file is a ``UsageError`` naming ``flag``."""
    from ..data.corpus import load_corpus

    def corpus():
        try:
            return load_corpus(
                files, tokenizer, max_len, num_proc=settings.num_proc, cache_dir=settings.cache_dir
            )
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None

    if env.world > 1:
        env.share(lambda: len(corpus()))
    return corpus()


def rare_word_table_for(settings, s, texts, tokenizer, saved, env, log):
    """TNF's rare words: the resumed run's, else the corpus words seen ``tnf_min_count`` to
    ``tnf_max_count`` times (None: no TNF, or no word in the band)."""
    from ..data.corpus import count_words, rare_word_table, rare_words

    if not s["tnf"]:
        return None
    if saved is not None:
        path = os.path.join(settings.out, RARE_FILE)
        try:
            words = read_lines(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"--resume: cannot read {path!r} ({one_line(exc, 300)}); the run "
                "folder is damaged or incomplete"
            ) from None
    else:
        low, high = s["tnf_min_count"], s["tnf_max_count"]
        words = env.share(lambda: rare_words(count_words(texts, tokenizer), tokenizer, low, high))
    table = rare_word_table(words, tokenizer) if words else None
    if table is None and saved is None:
        log(
            f"no word of the corpus occurs {s['tnf_min_count']} to {s['tnf_max_count']} times: "
            "training without TNF notes (lower --tnf-min-count or raise --tnf-max-count for some)"
        )
    return table


def training_rows(texts, max_len, pack, num_proc, env):
    """``(rows, fill)``: the texts packed several a row (``fill``: the packed and unpacked fill
    rates), or one a row (``fill`` None)."""
    if not pack:
        return texts, None
    from ..data.packing import pack as pack_texts

    if env.world > 1:  # rank 0 writes the packed cache; the other ranks then read it
        env.share(lambda: pack_texts(texts, max_len, num_proc=num_proc).rows)
    packed = pack_texts(texts, max_len, num_proc=num_proc)
    return packed.dataset, (packed.fill_rate, packed.unpacked_fill_rate)


def load_data(settings, s, tokenizer, max_len, saved, env, log):
    """The run's :data:`Data`: the corpus, its rows, TNF's table, the held-out texts (``--eval``,
    one a row)."""
    texts = load_texts("--data", settings.data, tokenizer, max_len, settings, env)
    table = rare_word_table_for(settings, s, texts, tokenizer, saved, env, log)
    rows, fill = training_rows(texts, max_len, s["pack"], settings.num_proc, env)
    held_out = None
    if settings.eval is not None:
        held_out = load_texts("--eval", [settings.eval], tokenizer, max_len, settings, env)
    return Data(texts, rows, fill, table, held_out)


# --------------------------------------------------------------------------------------- the model


def build_model(config, s, table, tokenizer, backend, device):
    """The masked-LM (or MC-BERT) model with TNF's notes, initialised from the seed; a size that
    does not fit or a backend that cannot run it is a ``UsageError``, before any file is written."""
    from ..models import TupeBertForMaskedLM, TupeBertForMultiChoicePretraining
    from ..nn import NoteDictionary

    torch.manual_seed(s["seed"])  # the initial weights
    notes = None
    if table is not None:
        notes = NoteDictionary(
            len(table),
            config.hidden_size,
            window=s["tnf_window"],
            gamma=s["tnf_gamma"],
            lam=s["tnf_lam"],
        )
    try:
        if s["objective"] == "mcbert":
            model = TupeBertForMultiChoicePretraining(
                config, note_dictionary=notes, mask_token_id=tokenizer.mask_token_id
            )
        else:
            model = TupeBertForMaskedLM(config, note_dictionary=notes)
        model.set_backend(backend)
    except ValueError as exc:
        raise UsageError(f"--backend: {exc}") from None
    except (MemoryError, RuntimeError) as exc:  # CPU allocator: RuntimeError; CUDA's: a subclass
        text = str(exc).lower()
        if not isinstance(exc, MemoryError) and "alloc" not in text and "out of memory" not in text:
            raise
        raise UsageError(
            f"the model does not fit in memory on {device} ({one_line(exc, 300)}); "
            "lower --max-seq-length, --hidden or --layers"
        ) from None
    return model


def initial_config(growth, config):
    """The config the model is built with: ``config``, or with ``--grow`` the schedule's first
    sizes (``GrowthSchedule.initial_config``; a SPEC that does not end at ``config``'s sizes is a
    ``UsageError``)."""
    if growth is None:
        return config
    try:
        return growth.initial_config(config)
    except ValueError as exc:
        raise UsageError(f"--grow: {exc} (end the SPEC at the model's sizes)") from None


def config_of(model):
    """The encoder's config (the one ``prune_model`` records the ticket in)."""
    return getattr(model, "bert", model).config


def fit_to_checkpoint(model, growth, ckpt):
    """Before the Trainer loads ``ckpt`` into the freshly built ``model``: grown to the checkpoint's
    step (``prepare_for_resume``, with ``--grow``) or pruned to the ticket its config records
    (``--early-bird``: the search is not run again)."""
    from .early_bird import prune_like_checkpoint
    from .growth import prepare_for_resume

    try:
        if growth is not None:
            prepare_for_resume(model, growth, ckpt)
        prune_like_checkpoint(model, ckpt)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--resume: {one_line(exc, 300)}") from None


def growth_lines(grower, log):
    """A ``TrainerCallback`` that logs one line at each growth ``grower`` (a ``GrowthCallback``
    added before it) makes."""
    from transformers import TrainerCallback

    class Lines(TrainerCallback):
        seen = 0

        def on_step_end(self, args, state, control, **kwargs):
            for e in grower.events[self.seen :]:
                log(
                    f"  growth after step {e['step']}: {e['growth']} "
                    f"({e['params_before'] / 1e6:.3f}M -> {e['params_after'] / 1e6:.3f}M "
                    f"parameters, optimizer state {e['optimizer_state']})"
                )
            self.seen = len(grower.events)

    return Lines()


def early_bird_search(args, model, data, tokenizer, s, show_bar, env, log, out):
    """EarlyBERT's search (``effbert.training.early_bird.search``) with the run's Trainer class on
    the run's data: no checkpoints, no evaluation, ``--early-bird-search-steps`` steps (0: one
    epoch) under the run's learning rate and warm-up share; then ``model`` is pruned to the ticket
    from its pre-search weights. The line it logs; its result in ``early_bird.json``."""
    import dataclasses

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..data.collator import DataCollatorForTupeMLM
    from .early_bird import search, search_line, start_line
    from .trainers import NonFiniteError

    steps = s["early_bird_search_steps"]
    share = args.warmup_steps / max(args.max_steps, 1) if args.warmup_steps >= 1 else 0.0
    search_args = dataclasses.replace(
        args,
        max_steps=steps or -1,
        num_train_epochs=1,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        warmup_steps=min(share, 0.999),
    )

    def make(bird):
        collator = DataCollatorForTupeMLM(
            tokenizer,
            rare_words=data.table,
            seed=s["seed"],
            mask_replace_prob=s["mask_replace_prob"],
            random_replace_prob=s["random_replace_prob"],
        )
        trainer = trainer_class(None, s["objective"] != "mcbert")(
            model=model,
            args=search_args,
            train_dataset=data.rows,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[bird],
        )
        trainer.remove_callback(PrinterCallback)
        if not show_bar:
            trainer.remove_callback(ProgressCallback)
        return trainer

    log(start_line(steps, s["early_bird_l1"], s["early_bird_draw_every"]))
    try:
        result = search(
            model,
            make,
            head_l1=s["early_bird_l1"],
            ffn_l1=s["early_bird_l1"],
            draw_every=s["early_bird_draw_every"],
            threshold=s["early_bird_threshold"],
            patience=s["early_bird_patience"],
            head_ratio=s["early_bird_head_ratio"],
            ffn_ratio=s["early_bird_ffn_ratio"],
        )
    except NonFiniteError as exc:
        raise UsageError(
            f"{exc} in the EarlyBERT search: stopping (lower --learning-rate)"
        ) from None
    except ValueError as exc:  # e.g. a ticket that leaves a layer no head
        raise UsageError(f"--early-bird: {one_line(exc, 300)}") from None
    log(search_line(result))
    if env.main:
        atomic_write(json.dumps(result, indent=2) + "\n", os.path.join(out, EARLY_BIRD_FILE))
    return result


def write_run_files(settings, run, saved, tokenizer, table, start):
    """A fresh run's files (tokenizer, rare words, run file); a reshaped resume's schedule; the log
    cut at ``start``."""
    out = settings.out
    os.makedirs(out, exist_ok=True)
    if saved is not None and settings.reshape_schedule:  # later resumes keep the reshaped schedule
        atomic_write(
            json.dumps({**saved, "schedule": run["schedule"]}, indent=2, sort_keys=True) + "\n",
            os.path.join(out, RUN_FILE),
        )
    if saved is None:
        tokenizer.save_pretrained(out)
        if run["settings"]["tnf"]:
            atomic_write(
                "".join(w + "\n" for w in (table.words if table is not None else [])),
                os.path.join(out, RARE_FILE),
            )
        atomic_write(json.dumps(run, indent=2, sort_keys=True) + "\n", os.path.join(out, RUN_FILE))
    truncate_log(os.path.join(out, LOG_FILE), start)
    truncate_log(os.path.join(out, GROWTH_FILE), start)  # growths after the checkpoint happen again


# ------------------------------------------------------------------------------------- the trainer


def training_arguments(settings, s, tr, schedule, per_device, device, show_bar):
    """``transformers.TrainingArguments`` of the run (under torchrun it starts the process group).
    Checkpoints go to ``DIR/checkpoints``; ``--eval`` is evaluated every ``--eval-steps`` (default:
    at each save)."""
    from transformers import TrainingArguments

    every = settings.eval_steps or settings.save_steps
    return TrainingArguments(
        output_dir=os.path.join(settings.out, CHECKPOINT_DIR),
        max_steps=settings.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=tr["gradient_accumulation_steps"],
        learning_rate=tr["learning_rate"],
        weight_decay=tr["weight_decay"],
        warmup_steps=schedule["warmup"],
        lr_scheduler_type="linear",
        optim="adamw_torch",
        max_grad_norm=tr["max_grad_norm"],
        adam_beta1=tr["adam_beta1"],
        adam_beta2=tr["adam_beta2"],
        adam_epsilon=tr["adam_epsilon"],
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        logging_first_step=False,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 1,
        save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if settings.eval is not None and every else "no",
        eval_steps=every or None,
        prediction_loss_only=True,
        per_device_eval_batch_size=settings.per_device_eval_batch_size or per_device,
        seed=s["seed"],
        data_seed=s["seed"],
        fp16=settings.fp16,
        bf16=settings.bf16,
        use_cpu=device.type == "cpu",
        report_to=list(settings.report_to),
        disable_tqdm=not show_bar,
        ddp_broadcast_buffers=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        fsdp=settings.fsdp or "",
        deepspeed=settings.deepspeed,
        average_tokens_across_devices=True,
    )


def trainer_class(schedule_steps, mlm):
    """``PretrainingTrainer`` with the run's schedule (``with_schedule``). Evaluation draws its
    masks from ``eval_collator``, reset each time: every evaluation masks the same pieces, and
    training (its masks, its dropout) stays what it is without ``--eval``. With ``mlm`` it logs
    ``eval_perplexity`` = exp(``eval_loss``)."""
    from .trainers import PretrainingTrainer

    class RunTrainer(with_schedule(PretrainingTrainer, schedule_steps)):
        eval_collator = None

        def evaluate(self, *args, **kwargs):
            if self.eval_collator is None:
                return super().evaluate(*args, **kwargs)
            train_collator, self.data_collator = self.data_collator, self.eval_collator
            self.eval_collator.step = 0
            # the eval DataLoader draws its seed from torch's generator: restored, so that dropout
            # after an evaluation is what it would be without one
            cpu = torch.random.get_rng_state()
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self.data_collator = train_collator
                torch.random.set_rng_state(cpu)
                if cuda is not None:
                    torch.cuda.set_rng_state_all(cuda)

        def log(self, logs, start_time=None):
            if mlm and "eval_loss" in logs:
                logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            super().log(logs, start_time)

    return RunTrainer


def _describe_mcbert(r):
    if "mc_loss" not in r:
        return ""
    return (
        f"  mlm {r['mlm_loss']:.4f}  multi-choice {r['mc_loss']:.4f}  acc "
        f"{r['mc_accuracy']:.3f} (replaced {r['mc_replaced_accuracy']:.3f}, "
        f"{100 * r['replaced_fraction']:.1f}% of tokens; cloze {r['mc_choice_accuracy']:.3f}, "
        f"chance {r['mc_choice_chance']:.3f})"
    )


def build_trainer(args, model, data, tokenizer, s, schedule, start, show_bar, out):
    """The trainer and its ``RunLog``; the masks continue where the checkpoint at ``start`` left
    them."""
    from ..data.collator import DataCollatorForTupeMLM
    from .trainers import MC_METRICS

    def collator():
        return DataCollatorForTupeMLM(
            tokenizer,
            rare_words=data.table,
            seed=s["seed"],
            mask_replace_prob=s["mask_replace_prob"],
            random_replace_prob=s["random_replace_prob"],
        )

    train_collator = collator()
    train_collator.step = start * args.gradient_accumulation_steps
    mcbert = s["objective"] == "mcbert"
    run_log = RunLog(
        os.path.join(out, LOG_FILE),
        keys=("notes_taken",) + MC_METRICS,
        describe=_describe_mcbert if mcbert else None,
        show_bar=show_bar,
    )
    trainer = trainer_class(schedule["steps"], not mcbert)(
        model=model,
        args=args,
        train_dataset=data.rows,
        eval_dataset=data.held_out,
        data_collator=train_collator,
        processing_class=tokenizer,
    )
    trainer.eval_collator = collator() if data.held_out is not None else None
    return run_log.install(trainer), run_log


def announce(log, model, data, tokenizer, s, tr, settings, world, device, backend):
    """The one line that says what is about to train."""
    config, table, fill = model.config, data.table, data.fill
    n_params = sum(p.numel() for p in model.parameters())
    precision = "fp16" if settings.fp16 else "bf16" if settings.bf16 else "fp32"
    log(
        f"pretraining a {config.num_hidden_layers}-layer {config.position_mode} BERT (hidden "
        f"{config.hidden_size}, {config.num_attention_heads} heads, {n_params / 1e6:.2f}M "
        f"parameters) on {len(data.texts)} texts of up to {config.max_position_embeddings} pieces, "
        f"{len(tokenizer)} pieces, "
        + (
            f"TNF notes for {len(table)} rare words (the words seen {s['tnf_min_count']} to "
            f"{s['tnf_max_count']} times in the corpus), "
            if table is not None
            else "no TNF, "
        )
        + f"{settings.max_steps} steps of {tr['batch_size']} rows on {world} x {device}, "
        f"backend {backend}"
        + (
            f", packed {len(data.rows)} rows (fill {100 * fill[0]:.1f}%, {100 * fill[1]:.1f}% "
            "unpacked)"
            if fill
            else ""
        )
        + (f", precision {precision}" if precision != "fp32" else "")
        + (f", growing by --grow {s['grow']}" if s["grow"] else "")
        + (
            f", objective MC-BERT (K = {model.num_candidates}, lambda = {model.loss_lambda:g}, "
            f"controller hidden {model.controller_config.hidden_size})"
            if s["objective"] == "mcbert"
            else ""
        )
    )


def train(trainer, folder, ckpt, start, out):
    """``trainer.train`` from ``ckpt`` (a full disk during a save, or a non-finite loss, is one
    line)."""
    from .trainers import NonFiniteError, _all_finite

    try:
        if folder is not None:  # held by the first process
            folder.step = start
            result = folder.train(trainer, ckpt)
        else:
            result = trainer.train(resume_from_checkpoint=ckpt)
    except NonFiniteError as exc:
        raise UsageError(
            f"{exc}: stopping (lower --learning-rate); the checkpoints in "
            f"{os.path.abspath(out)} are the last good ones, resume from them with "
            "--resume"
        ) from None
    fail_if(
        not _all_finite(trainer.model),
        f"non-finite weights after step "
        f"{trainer.state.global_step}: stopping (lower --learning-rate); the checkpoints in "
        f"{os.path.abspath(out)} are the last good ones",
    )
    return result


def evaluate_at_end(trainer, has_eval):
    """The held-out evaluation after the last step, unless the eval schedule has just made it
    (decided from Trainer's own log history, which every rank keeps: every rank evaluates)."""
    if not has_eval:
        return
    done = [r["step"] for r in trainer.state.log_history if "eval_loss" in r]
    if not done or done[-1] != trainer.state.global_step:
        trainer.evaluate()


def save_final(model, tokenizer, out):
    """``save_pretrained`` of the masked-LM model (MC-BERT's controller dropped) and the tokenizer
    in ``out``; every file of the run made 0644 (safetensors writes 0600)."""
    from ..models import TupeBertForMaskedLM, TupeBertForMultiChoicePretraining

    final = model
    if isinstance(model, TupeBertForMultiChoicePretraining):
        final = TupeBertForMaskedLM(model.config, note_dictionary=model.notes)
        final.load_state_dict(model.finetuning_state_dict())
    final.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_readable(out)


# -------------------------------------------------------------------------------------- the report


def report(out, result, start, steps, data):
    """``report.json`` (the run in numbers: losses, the last held-out evaluation) and
    ``loss.png``."""
    from .trainers import MC_METRICS

    path = os.path.join(out, LOG_FILE)
    every = [json.loads(x) for x in read_lines(path) if x.strip()] if os.path.isfile(path) else []
    losses = [r for r in every if "loss" in r]
    evals = [r for r in every if "eval_loss" in r]
    rep = {
        "steps": steps,
        "resumed_from": start,
        "seconds": round(result.metrics.get("train_runtime", 0.0), 3),
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "rare_words": len(data.table) if data.table is not None else 0,
        "notes_taken": losses[-1].get("notes_taken") if losses else None,
    }
    if data.fill:
        rep.update(fill_rate=data.fill[0], unpacked_fill_rate=data.fill[1])
    rep.update((k, losses[-1][k]) for k in MC_METRICS if losses and k in losses[-1])
    if evals:
        rep.update((k, v) for k, v in evals[-1].items() if k.startswith("eval_"))
        rep["eval_step"] = evals[-1]["step"]
    rep.update(method_report(out))
    atomic_write(json.dumps(rep, indent=2) + "\n", os.path.join(out, REPORT_FILE))
    plot_losses(losses, evals, os.path.join(out, PLOT_FILE), rep.get("growths"))
    return rep


def method_report(out):
    """The report's entries of ``--grow`` (``growths``: each growth's step and parameter counts
    before and after; ``parameters_before`` / ``parameters_after`` of the whole run) and of
    ``--early-bird`` (``early_bird``: the search's stop, the ticket, the distances and the
    parameter counts)."""
    from .growth import read_growth_log

    rep = {}
    events = read_growth_log(out)
    if events:
        rep.update(
            growths=events,
            parameters_before=events[0]["params_before"],
            parameters_after=events[-1]["params_after"],
        )
    path = os.path.join(out, EARLY_BIRD_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rep["early_bird"] = json.load(f)
    return rep


def plot_losses(losses, evals, path, growths=None):
    """The training loss and the held-out loss against the step, in ``path`` (nothing without
    matplotlib or with fewer than two points); ``growths`` (``read_growth_log``'s records) marked
    as dashed lines."""
    if len(losses) + len(evals) < 2:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], ".-", label="training loss")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="held-out loss (--eval)",
        )
        ax.legend()
    if growths:
        from .growth import mark_growth

        mark_growth(ax, growths)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("effbert pretrain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    make_readable(path)


# ----------------------------------------------------------------------------------------- the run


def run(settings, log):
    """Pretrain as ``settings`` say (see the module docstring); ``log(str)`` hears the progress
    lines (rank 0 only). Returns the trained model. Raises ``UsageError`` (one line) for anything
    the user can fix."""
    env = Dist()
    try:
        return _run(settings, env, log if env.main else (lambda *_: None))
    finally:
        if env.on:
            torch.distributed.destroy_process_group()


def _setup(settings, env):
    """The device, the backend, and whether a progress bar shows (a person watching a terminal)."""
    import transformers

    device = parse_device(settings.device)
    show_bar = env.main and not settings.quiet and stderr_is_terminal()
    if not show_bar:  # a log file gets the periodic lines, never a bar's carriage returns
        quiet_libraries()
    transformers.logging.set_verbosity_error()
    return device, settings.backend or default_backend(device), show_bar


def _run(settings, env, log):
    # the device, the backend, and a progress bar only for a person watching
    device, backend, show_bar = _setup(settings, env)
    # the run folder: fresh, or the run to resume and its newest complete checkpoint
    folder = getattr(settings, "run_folder", None)  # held by the first process
    where = folder or RunFolder(settings.out, "effbert pretrain", WRITES)
    where.checkpoint_root = os.path.join(settings.out, CHECKPOINT_DIR)
    saved, ckpt = prepare_out(settings, where, log)
    # the settings (given, else the resumed run's, else the defaults), the schedule, Trainer's
    s, tr = resolve(settings, saved, env.world)
    schedule = learning_rate_schedule(settings, tr, saved, ckpt)
    per_device = per_device_batch(tr, env.world)
    args = training_arguments(settings, s, tr, schedule, per_device, device, show_bar)
    start = checkpoint_step(ckpt)
    fail_if(
        start > settings.max_steps,
        f"--max-steps {settings.max_steps} is below the step the "
        f"run in {settings.out!r} reached ({start}); give --max-steps >= {start}",
    )
    # the tokenizer (trained on the corpus by rank 0) and the model's config
    tokenizer = tokenizer_of_run(settings, s, saved, env, log)
    config = build_config(settings, s, tokenizer, saved["config"] if saved else None)
    s["pack"] = packs(settings, s)  # the run file records what the run did
    # --grow: the model starts at the schedule's first sizes and ends at the config's
    growth = check_methods(s)
    first = initial_config(growth, config)
    # the data: training rows, TNF's rare words, the held-out texts
    data = load_data(settings, s, tokenizer, config.max_position_embeddings, saved, env, log)
    # the model, and the checkpoint it resumes from
    model = build_model(first, s, data.table, tokenizer, backend, device)
    if ckpt is not None:
        fit_to_checkpoint(model, growth, ckpt)  # grown or pruned as the checkpoint's model is
        check_checkpoint(ckpt, model)
        log(f"resuming from step {start} ({ckpt})")
    if saved is not None:
        log(
            schedule_line(
                (saved.get("schedule") or schedule)["steps"],
                settings.max_steps,
                settings.reshape_schedule,
                schedule["warmup"],
            )
        )
    # the run files (rank 0), then every rank's trainer
    if env.main:
        write_run_files(
            settings,
            run_file(settings, s, tr, config, schedule, saved),
            saved,
            tokenizer,
            data.table,
            start,
        )
    env.barrier()
    # --early-bird: EarlyBERT's search and the pruned model the run trains (a resume: pruned above)
    if s["early_bird"] and not getattr(config_of(model), "early_bird_ticket", None):
        early_bird_search(args, model, data, tokenizer, s, show_bar, env, log, settings.out)
    trainer, _ = build_trainer(
        args, model, data, tokenizer, s, schedule, start, show_bar, settings.out
    )
    if growth is not None:
        from .growth import GrowthCallback

        grower = GrowthCallback(
            growth,
            optimizer_state=s["grow_optimizer_state"],
            log_dir=settings.out if env.main else None,
        )
        trainer.add_callback(grower)
        trainer.add_callback(growth_lines(grower, log))
    announce(log, model, data, tokenizer, s, tr, settings, env.world, device, backend)
    # train, evaluate the held-out text at the end, save the model, report
    t0 = time.perf_counter()
    result = train(trainer, folder, ckpt, start, settings.out)
    evaluate_at_end(trainer, data.held_out is not None)
    if env.main:
        save_final(model, tokenizer, settings.out)
        report(settings.out, result, start, settings.max_steps, data)
        log(
            f"done: {settings.max_steps} steps in {time.perf_counter() - t0:.1f} s, model in "
            f"{os.path.abspath(settings.out)} (load it with effbert.models.load_pretrained or "
            "AutoModelForMaskedLM.from_pretrained)"
        )
    dump_state(settings, model, env)
    env.barrier()
    return model


def run_file(settings, s, tr, config, schedule, saved):
    """What ``pretrain.json`` records: the settings a resume keeps, the config, the schedule, the
    vocabulary size asked for and the data's fingerprints (size and the ends' SHA-256)."""
    if saved is not None:
        vocab_size, data = saved.get("vocab_size"), saved.get("data")
    else:
        vocab_size = None if settings.vocab else settings.vocab_size or 8000
        data = [fingerprint(f) for f in settings.data]
    return {
        "settings": s,
        "training": tr,
        "config": json.loads(config.to_json()),
        "schedule": schedule,
        "vocab_size": vocab_size,
        "data": data,
    }


def dump_state(settings, model, env):
    """Tests: each rank's parameters and notes at the end (``--dump-state``)."""
    if settings.dump_state:
        path = settings.dump_state if env.world == 1 else f"{settings.dump_state}.rank{env.rank}"
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
