"""``effbert finetune``: multi-exit classification on a user's own labelled text through ``transformers.Trainer``,
then a speed-accuracy report of batched early exit over exit thresholds.

    effbert finetune --hf ./bert-base-uncased --train train.tsv --eval dev.tsv --out run/
    effbert finetune --init pretrain-run/ --train train.tsv --eval dev.tsv --out run/ --epochs 3

Data: one example a line, ``label<TAB>text``; labels are strings, given ids in sorted order (the model config's
``id2label``); with ``--regression`` they are numbers and the head has one output (MSE). The examples become a
``datasets.Dataset`` tokenized in batches by a ``BertTokenizerFast``. The encoder comes from an ``effbert pretrain``
folder (``--init``: a ``save_pretrained`` folder of ``TupeBertForMaskedLM`` with its tokenizer) or a local Hugging
Face BERT folder (``--hf``: its ``config.json``, ``model.safetensors`` and ``vocab.txt`` or ``tokenizer.json``); an
off-ramp (pooler and classifier) follows every layer, every off-ramp's pooler starting from the checkpoint's pooler
(DeeBERT, RomeBERT) or sharing one (``--shared-pooler``, PABEE).

Training is ``transformers.Trainer`` (mixed precision, gradient accumulation, checkpoints and ``--resume``,
logging, torchrun data parallelism) with the early-exit loss as its ``compute_loss``: RomeBERT's self-distillation
loss (``--loss romebert``, gamma 0.9 and T 3 as published, with ``--ge``), PABEE's layer-weighted loss (``--loss
pabee``) or DeeBERT's two stages (``--loss deebert``: two Trainer runs, the second with the backbone and final
classifier frozen). RomeBERT's gradient regularization (``--grad-reg``/``--project``) needs two backward passes: it
is the Trainer's ``training_step``. docs/finetune.md says which published setting each option reproduces.

On ``--eval``: every exit's accuracy (MSE for ``--regression``), then for a range of thresholds of ``--criterion`` the
batched early exit's average exit layer, layers saved, measured speed-up (CPU time on a CPU, wall time on a GPU,
against a full-depth pass of the same batched loop: the median of interleaved pairs, marked when above the bound the
layers set) and accuracy, printed as a table and written to ``DIR/report.json`` and ``DIR/report.png`` (with
matplotlib). ``DIR`` is a ``save_pretrained`` folder (``config.json``, ``model.safetensors``, the tokenizer files)
plus ``finetune.json``: ``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads the multi-exit model, and
``load_finetuned(DIR)`` gives it with its tokenizer, labels and settings for ``model.early_exit``.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import shutil
import statistics
import sys
import time

import torch

from . import UsageError, check_backend, check_out_dir, parse_device, run_command
from .recipes import check_optimizer_flags, checker
from ..training.run_folder import (MODEL_FILES, RunFolder, atomic_write, check_same_data, checkpoint_max_steps, fingerprint,
                         newest_complete, schedule_line, with_schedule)

__all__ = ["main", "load_finetuned", "read_tsv", "UsageError"]

CONFIG_FILE, SETTINGS_FILE, REPORT_FILE, PLOT_FILE = "config.json", "finetune.json", "report.json", "report.png"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, VOCAB_FILE = "tokenizer.json", "tokenizer_config.json", "vocab.txt"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # save_pretrained's; the second from older checkpoints
CHECKPOINTS = "checkpoints"  # Trainer's checkpoint-N folders (--save-steps), under --out
LOSSES = ("romebert", "pabee", "deebert")
PROJECT = ("others", "final")
CRITERIA = ("entropy", "max_prob", "patience")


def _fail_if(cond, msg):
    if cond:
        raise UsageError(msg)


# ------------------------------------------------------------------------------------------------------ data


def read_tsv(path, flag="--train"):
    """``(labels, texts)`` of a ``label<TAB>text`` file; blank lines are skipped. Errors name the flag and line."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no such file {path!r}")
    labels, texts = [], []
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as exc:
        line = _line_at(path, exc.start)
        raise UsageError(f"{flag}: {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}, line {line}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): a text may hold U+2028 and the like
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        _fail_if(not tab, f"{flag}: line {n} of {path!r} has no TAB (expected label<TAB>text)")
        label = label.strip()
        _fail_if(not label, f"{flag}: line {n} of {path!r} has an empty label")
        labels.append(label)
        texts.append(text)
    _fail_if(not texts, f"{flag}: {path!r} holds no examples")
    return labels, texts


def _numbers(names, flag):
    """``--regression`` targets: every label a finite number, as float32 ``[B]``."""
    out = []
    for n, name in enumerate(names, 1):
        try:
            v = float(name)
        except ValueError:
            v = float("nan")
        _fail_if(not math.isfinite(v), f"{flag}: example {n} has the label {name!r}, not a finite number "
                 "(--regression)")
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)


def _line_at(path, offset):
    """The 1-based line of byte `offset` of a file."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


# a first line whose label is one of these, seen nowhere else in the file, is a header row
_HEADER_LABELS = {"label", "labels", "class", "category", "target", "y", "sentiment", "topic", "intent"}


def check_labels(labels, texts, path, flag="--train", warn=None):
    """Refuse a label column that holds text (the columns swapped: nearly one label per example) and a header row
    taken for an example; ``warn(msg)`` hears about a label seen on one line only when others repeat."""
    from collections import Counter

    counts = Counter(labels)
    n = len(labels)
    if n >= 8 and len(counts) > n // 2:
        many = f"{len(counts)} different labels in {n} examples of {path!r}"
        wordy = sum(1 for lab in counts if len(lab.split()) > 2)
        _fail_if(2 * wordy >= len(counts), f"{flag}: {many}, {wordy} of them several words long: is the file "
                 "text<TAB>label? expected label<TAB>text")
        if warn is not None:
            warn(f"{flag}: {many}: few examples a class (is the first column the label?)")
    first = labels[0]
    if counts[first] == 1 and n > 1 and (first.lower() in _HEADER_LABELS
                                         or texts[0].strip().lower() in ("text", "sentence", "texts", "review")):
        raise UsageError(f"{flag}: line 1 of {path!r} ({first!r}<TAB>{texts[0][:20]!r}) looks like a header "
                         "row; remove it (the file is label<TAB>text with no header)")
    once = sorted(lab for lab, c in counts.items() if c == 1)
    if warn is not None and once and len(once) < len(counts) and n >= 4 * len(counts):
        warn(f"{flag}: label(s) {once[:5]} occur on one line only in {path!r}: a typo or a stray row?")


def _encode(tokenizer, texts, max_len):
    """``(ids [B, n] int64 right-padded with the pad id, lengths [B] int64)``: each text as the tokenizer gives it
    ([CLS] ... [SEP]), cut to ``max_len`` pieces."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, return_token_type_ids=False,
                    return_attention_mask=False)["input_ids"]
    lengths = torch.tensor([len(x) for x in enc], dtype=torch.int64)
    ids = torch.full((len(enc), int(lengths.max()) if enc else 0), tokenizer.pad_token_id or 0, dtype=torch.int64)
    for i, x in enumerate(enc):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
    return ids, lengths


def _batches(ids, lengths, rows, device):
    """One batch cut to its longest row: ``(ids [b, n], attention mask [b, n] bool)`` on ``device``."""
    b_len = lengths[rows]
    n = int(b_len.max())
    mask = torch.arange(n)[None] < b_len[:, None]
    return ids[rows, :n].to(device), mask.to(device)


def _dataset(tokenizer, texts, targets, max_len):
    """The training examples as a ``datasets.Dataset`` (``input_ids``, ``attention_mask``, ``labels``), tokenized in
    batches by the fast tokenizer; the collator pads each batch to its longest row."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": list(texts), "labels": targets.tolist()})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_len, return_token_type_ids=False),
                  batched=True, remove_columns=["text"])


# ----------------------------------------------------------------------------------------------------- model


def _default_backend(device):
    # On the CPU the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, far too slow to train with.
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "eager"
    return "auto"


def _one_line(exc, limit=400):
    return " ".join(str(exc).split())[:limit]


def _tokenizer(path, flag, cased):
    """``BertTokenizerFast`` of a folder (``tokenizer.json`` or ``vocab.txt``, ``tokenizer_config.json``);
    ``cased`` None keeps the folder's casing. A tokenizer that does not load is a one-line ``UsageError``."""
    from transformers import BertTokenizerFast

    if not any(os.path.isfile(os.path.join(path, n)) for n in (TOKENIZER_FILE, VOCAB_FILE)):
        raise UsageError(f"{flag}: {path!r} holds neither {TOKENIZER_FILE} nor {VOCAB_FILE} (the tokenizer)")
    kw = {} if cased is None else {"do_lower_case": not cased}
    try:
        tok = BertTokenizerFast.from_pretrained(path, **kw)
    except Exception as exc:  # a damaged tokenizer.json / vocab.txt: whatever the library raises
        raise UsageError(f"{flag}: the tokenizer in {path!r} does not load ({_one_line(exc, 300)})") from None
    if tok.pad_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise UsageError(f"{flag}: the tokenizer in {path!r} lacks [PAD], [CLS] or [SEP]")
    return tok


def _lowercases(tokenizer):
    return bool(getattr(tokenizer, "do_lower_case", True))


def _multi_exit_config(config, num_labels, shared_pooler, backend):
    values = config.to_dict()
    values.update(multi_exit=True, num_labels=num_labels, shared_exit_pooler=bool(shared_pooler), backend=backend,
                  tnf_num_notes=None)  # TNF's notes help pretraining only: fine-tuning runs the plain encoder
    for key in ("id2label", "label2id", "architectures", "transformers_version", "model_type"):
        values.pop(key, None)
    from ..models import TupeBertConfig

    return TupeBertConfig.from_dict(values)


def _classifier_from(encoder_model, config, num_labels, pooler=None, classifier=None, shared_pooler=False):
    """A multi-exit ``TupeBertForSequenceClassification`` with ``encoder_model``'s embeddings and layers. Every
    off-ramp's pooler starts from ``pooler`` (a state dict) when given, else from the last off-ramp's fresh one, as
    DeeBERT and RomeBERT copy the pooler into every off-ramp (``shared_pooler``: one pooler for all, PABEE); the last
    off-ramp's classifier starts from ``classifier`` when given."""
    from ..models import TupeBertForSequenceClassification

    model = TupeBertForSequenceClassification(_multi_exit_config(config, num_labels, shared_pooler, config.backend))
    state = {k: v for k, v in encoder_model.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"the encoder weights do not fit: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    last = model.exits[-1]
    model.init_exit_poolers(pooler if pooler is not None else last.pooler.state_dict())
    if classifier is not None and classifier["weight"].shape[0] == num_labels:
        last.classifier.load_state_dict(classifier)
    return model


def _from_hf(path, num_labels, backend, cased, shared_pooler=False):
    """A local Hugging Face BERT folder: ``(multi-exit classifier, tokenizer, cased)``."""
    from ..integrations.hf import _transformers, from_hf_bert
    from ..models import TupeBertForSequenceClassification, TupeBertModel

    _fail_if(not os.path.isdir(path), f"--hf: {path!r} is not a folder (a local Hugging Face BERT checkpoint)")
    try:
        _transformers()
    except ImportError as exc:  # the message says how to install it
        raise UsageError(f"--hf: {exc}") from None
    _model_type(path, "--hf", want="bert")
    tokenizer = _tokenizer(path, "--hf", cased)
    try:
        hf = from_hf_bert(path, backend=backend)
    except (ValueError, OSError, ImportError, KeyError) as exc:  # ImportError: transformers missing, it says how
        raise UsageError(f"--hf: {_one_line(exc)}") from exc
    pooler = classifier = None
    if isinstance(hf, TupeBertForSequenceClassification):
        encoder = hf.bert
        classifier = hf.classifier.state_dict()
    elif isinstance(hf, TupeBertModel):
        encoder = hf
    else:  # a masked-LM checkpoint: its encoder only
        encoder = hf.bert
    if encoder.pooler is not None:
        pooler = encoder.pooler.dense.state_dict()
    model = _classifier_from(encoder, encoder.config, num_labels, pooler, classifier, shared_pooler)
    return model, tokenizer, not _lowercases(tokenizer)


def _model_type(path, flag, want):
    """The ``model_type`` of a checkpoint folder's ``config.json``: a one-line ``UsageError`` when the file is
    missing, not JSON, or names another model type than ``want``."""
    cfg = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg):
        raise UsageError(f"{flag}: {path!r} holds no {CONFIG_FILE}: not a checkpoint folder")
    try:
        with open(cfg, encoding="utf-8") as f:
            found = json.load(f).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise UsageError(f"{flag}: {cfg!r} is not a JSON config ({_one_line(exc, 200)})") from None
    if found != want:
        hint = ("an effbert (tupe-bert) checkpoint goes with --init" if flag == "--hf" else
                "a Hugging Face BERT goes with --hf")
        raise UsageError(f"{flag}: {cfg!r} is a checkpoint of model type {found!r}, not {want!r} ({hint})")
    return found


def _from_pretrain(path, num_labels, backend, cased, shared_pooler=False):
    """An ``effbert pretrain`` output (a ``save_pretrained`` folder of ``TupeBertForMaskedLM`` with its tokenizer; a
    run stopped early: its latest ``checkpoint-N``): ``(multi-exit classifier, tokenizer, cased)``. The masked-LM
    head and TNF's notes are left out (the TNF paper fine-tunes the plain encoder)."""
    from ..models import TupeBertConfig, TupeBertForSequenceClassification

    _fail_if(not os.path.isdir(path), f"--init: {path!r} is not a folder (an effbert pretrain output)")
    weights = path
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES):
        weights = newest_complete(path, need=MODEL_FILES)
        if weights is None and (os.path.isfile(os.path.join(path, "model.pt"))
                                or glob.glob(os.path.join(glob.escape(path), "checkpoint-*.pt"))):
            return _from_legacy_pretrain(path, num_labels, backend, cased, shared_pooler)
        _fail_if(weights is None, f"--init: {path!r} holds no weights ({' or '.join(WEIGHT_FILES)}, or a "
                 "checkpoint-N folder): not the folder of an effbert pretrain run")
    _model_type(weights, "--init", want=TupeBertConfig.model_type)
    tokenizer = _tokenizer(path if os.path.isfile(os.path.join(path, TOKENIZER_FILE))
                           or os.path.isfile(os.path.join(path, VOCAB_FILE)) else weights, "--init", None)
    if cased is not None and cased == _lowercases(tokenizer):
        raise UsageError(f"--cased {'given' if cased else 'not given'}, but the pretraining run "
                         f"{'lowercased' if _lowercases(tokenizer) else 'kept case'}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the off-ramps are new by design: checked below, not reported as missing
    try:
        config = _multi_exit_config(TupeBertConfig.from_pretrained(weights), num_labels, shared_pooler, backend)
        model, info = TupeBertForSequenceClassification.from_pretrained(weights, config=config,
                                                                        output_loading_info=True)
    except Exception as exc:  # a cut or foreign weights file, a config that fails its checks: one line
        raise UsageError(f"--init: {_one_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith("exits.")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(("mlm_head.", "notes."))]
    if missing or unexpected or info.get("mismatched_keys") or info.get("error_msgs"):
        raise UsageError(f"--init: the weights in {weights!r} do not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, mismatched {list(info.get('mismatched_keys') or [])[:5]}")
    model.init_exit_poolers(model.exits[-1].pooler.state_dict())  # no pooler in pretraining: one fresh one for all
    return model.train(), tokenizer, not _lowercases(tokenizer)


def _from_legacy_pretrain(path, num_labels, backend, cased, shared_pooler):
    """The folder of an earlier ``effbert pretrain`` (``config.json``, ``vocab.txt``, ``pretrain.json`` and the
    final ``model.pt`` or the latest ``checkpoint-*.pt``), read with ``torch.load(..., weights_only=True)``."""
    from ..models import TupeBertConfig, TupeBertForMaskedLM

    try:
        for name in (CONFIG_FILE, VOCAB_FILE, "pretrain.json"):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{path!r} holds no {name}: not the folder of an effbert pretrain run")
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            config = TupeBertConfig.from_json(f.read())
        with open(os.path.join(path, "pretrain.json"), encoding="utf-8") as f:
            run_cased = bool(json.load(f).get("settings", {}).get("cased", False))
        final = os.path.join(path, "model.pt")
        if os.path.isfile(final):
            state = torch.load(final, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        else:
            ckpt = sorted(glob.glob(os.path.join(glob.escape(path), "checkpoint-*.pt")))[-1]
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            state = state.get("model") if isinstance(state, dict) else None
            if not isinstance(state, dict):
                raise ValueError(f"{ckpt!r} is not a checkpoint of effbert pretrain (no model state)")
        config.tnf_num_notes = None
        config.backend = backend
        mlm = TupeBertForMaskedLM(config)
        mlm.load_state_dict({k: v for k, v in state.items() if not k.startswith("notes.")})
    except Exception as exc:  # a cut, tampered or foreign file: one line
        raise UsageError(f"--init: {_one_line(exc)}") from None
    if cased is not None and cased != run_cased:
        raise UsageError(f"--cased {'given' if cased else 'not given'}, but the pretraining run "
                         f"{'kept case' if run_cased else 'lowercased'}")
    tokenizer = _tokenizer(path, "--init", run_cased)
    return _classifier_from(mlm.bert, mlm.config, num_labels, shared_pooler=shared_pooler), tokenizer, run_cased


def save_finetuned(out, model, tokenizer, labels, settings):
    """The run's folder: ``save_pretrained`` of the model (labels as ``id2label``) and the tokenizer, then
    ``finetune.json`` (the settings) last, so a folder with it is complete."""
    os.makedirs(out, exist_ok=True)
    config = model.config
    backend = config.backend
    config.backend = "auto"  # the run's backend belongs to the run, not the model
    config.id2label = {i: name for i, name in enumerate(labels)}
    config.label2id = {name: i for i, name in enumerate(labels)}
    if settings.get("regression"):
        config.problem_type = "regression"
    try:
        model.save_pretrained(out)
    finally:
        config.backend = backend
    tokenizer.save_pretrained(out)
    atomic_write(json.dumps(settings, indent=2, sort_keys=True) + "\n", os.path.join(out, SETTINGS_FILE))


def load_finetuned(path, device=None, backend="auto"):
    """A model ``effbert finetune`` wrote to ``path``: ``(TupeBertForSequenceClassification with off-ramps, in
    eval mode; BertTokenizerFast; labels, a list of str indexed by class id; settings dict, with max_len)``.
    The folder is also a ``transformers`` checkpoint: ``AutoModelForSequenceClassification.from_pretrained(path)``
    gives the same model. Raises ``FileNotFoundError`` for a folder that is not such a run and ``ValueError`` for
    weights or a tokenizer that cannot be read (weights are read as safetensors, or with
    ``torch.load(..., weights_only=True)``: never unpickled code)."""
    from transformers import BertTokenizerFast

    from ..models import TupeBertForSequenceClassification

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path must be the folder of an effbert finetune run, got {path!r}")
    path = os.fspath(path)
    for name in (CONFIG_FILE, SETTINGS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"path: {path!r} holds no {name}: not the folder of an effbert finetune run")
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES):
        raise FileNotFoundError(f"path: {path!r} holds no {WEIGHT_FILES[0]}: not the folder of an effbert "
                                "finetune run")
    with open(os.path.join(path, SETTINGS_FILE), encoding="utf-8") as f:
        settings = json.load(f)
    try:
        model = TupeBertForSequenceClassification.from_pretrained(path, backend=backend)
    except Exception as exc:  # a cut, tampered or foreign file
        raise ValueError(f"path: cannot read the model in {path!r} ({_one_line(exc, 300)})") from None
    if not model.config.multi_exit:
        raise ValueError(f"path: {path!r} holds a model without off-ramps (config.multi_exit is false)")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    try:
        tokenizer = BertTokenizerFast.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"path: the tokenizer in {path!r} does not load ({_one_line(exc, 300)})") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, labels, settings


# -------------------------------------------------------------------------------------------------- training


def _set_deebert_stage(model, stage):
    """DeeBERT's stage 2 freezes the backbone and the final classifier: only the other off-ramps learn."""
    frozen = stage == 2
    model.bert.requires_grad_(not frozen)
    last = model.exits[-1]
    last.requires_grad_(not frozen)
    for head in list(model.exits)[:-1]:
        for p in head.parameters():
            p.requires_grad_(not (frozen and any(p is q for q in last.parameters())))


def _callbacks(a, log):
    """The summary line every ``--log-every`` steps and the NaN stop, as a ``TrainerCallback`` (Trainer logs every
    step: its log history holds each step's loss, also across a resume)."""
    from transformers import TrainerCallback

    class Lines(TrainerCallback):
        def __init__(self):
            self.bad = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            if not math.isfinite(logs["loss"]):
                self.bad = (logs["loss"], state.global_step)
                control.should_training_stop = True
                control.should_save = False  # a non-finite model is never checkpointed
                return
            step = state.global_step
            if state.is_world_process_zero and (step % a.log_every == 0 or step == state.max_steps):
                recent = [h["loss"] for h in state.log_history if "loss" in h][-a.log_every:]
                log(f"  step {step:6d}  loss {sum(recent) / len(recent):.4f}  lr {logs.get('learning_rate', 0):.2e}")

    return Lines()


def _quiet_progress_class():
    """Trainer's tqdm bar without its per-log dict lines (the summary lines say the loss)."""
    from transformers.trainer_callback import ProgressCallback

    class Bar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return Bar


def _main_process():
    return int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK


def _show_progress(a):
    # a progress bar only on a terminal: a log file gets the periodic lines, never carriage returns
    return not a.quiet and sys.stderr.isatty()


def _training_args(a, output_dir, device, stage):
    from transformers import TrainingArguments

    save = a.save_steps > 0
    # transformers 5 takes the warm-up share as a float warmup_steps; transformers 4 as warmup_ratio
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = {"warmup_ratio": a.warmup} if "warmup_ratio" in names else {"warmup_steps": a.warmup}
    try:
        return TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, weight_decay=a.weight_decay,
            lr_scheduler_type="linear", max_grad_norm=a.max_grad_norm, **warmup, adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2, adam_epsilon=a.adam_epsilon,
            num_train_epochs=a.epochs, max_steps=a.steps if a.steps is not None else -1,
            seed=a.seed + stage - 1, data_seed=a.seed + stage - 1, fp16=a.fp16, bf16=a.bf16,
            use_cpu=device.type == "cpu", logging_strategy="steps", logging_steps=1,
            logging_nan_inf_filter=False,  # a NaN loss must reach the log, which stops the run
            save_strategy="steps" if save else "no", save_steps=a.save_steps if save else 500,
            save_total_limit=a.save_total_limit, report_to="none", disable_tqdm=not _show_progress(a),
            remove_unused_columns=False, dataloader_drop_last=False,
            # DeeBERT's stage 1 leaves the lower off-ramps without a gradient; the other losses use every weight
            ddp_find_unused_parameters=a.loss == "deebert")
    except (ValueError, ImportError) as exc:  # e.g. --fp16 without a GPU: TrainingArguments says why
        raise UsageError(_one_line(exc)) from None


def train(a, model, tokenizer, train_ds, device, backend, log):
    """Fine-tunes ``model`` in place through ``transformers.Trainer``; DeeBERT's loss runs its two stages,
    ``a.steps`` (or epochs) each. Returns ``(model in eval mode, every optimizer step's loss, the last Trainer)``."""
    from transformers import DataCollatorWithPadding
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..training import MultiExitTrainer

    stages = [1, 2] if a.loss == "deebert" else [1]
    root = os.path.join(a.out, CHECKPOINTS)
    losses = []
    for stage in stages:
        folder = root if a.loss != "deebert" else os.path.join(root, f"stage-{stage}")
        if a.loss == "deebert":
            _set_deebert_stage(model, stage)
            log("DeeBERT stage 1: the backbone and the final classifier on the last exit's loss" if stage == 1 else
                "DeeBERT stage 2: backbone and final classifier frozen, the off-ramps on the sum of their losses")
            later = os.path.join(root, "stage-2")
            if stage == 1 and a.resume and newest_complete(later) is not None:
                done = newest_complete(folder)  # stage 1 ended: its losses are in its last checkpoint
                if done is not None:
                    with open(os.path.join(done, "trainer_state.json"), encoding="utf-8") as f:
                        losses += [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]
                log("  (stage 1 finished before the resume)")
                continue
        resume = newest_complete(folder, log) if a.resume else None
        # a resume keeps the schedule the run started with (Trainer's state records its length) unless reshaped
        kept = checkpoint_max_steps(resume) if resume is not None and not a.reshape_schedule else None
        lines = _callbacks(a, log)
        trainer = with_schedule(MultiExitTrainer, kept)(
            model=model, args=_training_args(a, folder, device, stage), train_dataset=train_ds,
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, callbacks=[lines],
            loss=a.loss, gamma=a.gamma, temperature=a.temperature, gradient_equilibrium=a.ge, stage=stage,
            grad_reg=a.grad_reg, project=a.project)
        trainer.remove_callback(PrinterCallback)
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_quiet_progress_class())
        count, per_epoch = len(train_ds), trainer.get_train_dataloader().__len__()
        steps = a.steps if a.steps is not None else max(1, math.ceil(a.epochs * per_epoch / a.grad_accum))
        what = {"romebert": f"romebert (gamma {a.gamma}, temperature {a.temperature}"
                            + (f", gradient projection of the {a.project} side" if a.grad_reg else "") + ")",
                "pabee": "pabee", "deebert": f"deebert stage {stage}"}[a.loss]
        if a.regression and a.loss == "romebert":
            what = "pabee's mean squared error (a regression head)"
        if trainer.is_world_process_zero():
            head = "a regression head" if a.regression else f"{model.config.num_labels} labels"
            batch = a.batch_size * a.grad_accum * trainer.args.world_size  # examples an optimizer step
            log(f"fine-tuning {model.config.num_hidden_layers} off-ramps, {head}, {count} examples: {steps} steps "
                f"of {batch} ({steps * a.grad_accum / per_epoch:.2f} epochs), loss {what}"
                + (", gradient equilibrium" if a.ge else "") + f", backend {backend}"
                + (f", resumed from {resume}" if resume else ""))
            if resume is not None:
                log("  " + schedule_line(kept or checkpoint_max_steps(resume) or steps, steps, a.reshape_schedule))
        t0 = time.perf_counter()
        run_folder = getattr(a, "run_folder", None)  # held by the first process
        if run_folder is not None:
            run_folder.checkpoint_root = folder  # a stop names this stage's intact checkpoint
            run_folder.train(trainer, resume)  # a full disk during a save: one line naming the intact checkpoint
        else:
            trainer.train(resume_from_checkpoint=resume)
        if lines.bad is not None:
            raise UsageError(f"the loss is {lines.bad[0]} at step {lines.bad[1]}: lower --lr")
        losses += [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if a.grad_reg and trainer.is_world_process_zero():
            n = 0 if trainer.projected is None else int(trainer.projected)
            log(f"gradient regularization: the {a.project} side projected on {n} of {trainer.state.global_step} "
                "steps" + (" (since the resume)" if resume else ""))
        if trainer.is_world_process_zero():
            log(f"trained in {time.perf_counter() - t0:.1f} s")
    if a.loss == "deebert":
        _set_deebert_stage(model, 1)  # unfrozen again for whoever trains it next
    for folder in (os.path.join(root, "stage-1"), os.path.join(root, "stage-2"), root):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # Trainer makes its output folder even when it keeps no checkpoint
    return model.eval(), losses, trainer


# ---------------------------------------------------------------------------------------------------- report


TIMING_ROUNDS = 3  # full-depth / early-exit pairs timed per threshold


def _run_early_exit(model, ids, lengths, batch, device, **kw):
    """Batched early exit over every row, ``batch`` rows at a time: ``(logits [n, C], exit layers [n])``."""
    logits, layers = [], []
    for s in range(0, ids.shape[0], batch):
        b_ids, mask = _batches(ids, lengths, torch.arange(s, min(s + batch, ids.shape[0])), device)
        z, layer = model.early_exit(b_ids, mask, **kw)
        logits.append(z)
        layers.append(layer)
    return torch.cat(logits), torch.cat(layers)


def cost_clock(device):
    """The clock a pass is charged on: on a CPU the process's CPU time over all its threads (a pass waiting while
    other jobs hold the cores accrues none, so a shared machine moves it far less than wall time); on a GPU the wall
    time between synchronisations."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def paired_speedup(model, ids, lengths, batch, device, full, early, rounds=None):
    """Speed-up of early exit (``model.early_exit(**early)``) over full depth (``**full``) on the same rows, robust
    to a shared machine: ``rounds`` pairs (``TIMING_ROUNDS``) with the order alternating (full, early), (early,
    full), ..., each pair's ratio of costs on ``cost_clock``; the median ratio is the speed-up. Returns
    ``(speed-up, median full-depth seconds, early logits, early exit layers)``."""
    clock = cost_clock(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ratios, fulls = [], []
    for r in range(rounds or TIMING_ROUNDS):
        cost = {}
        for name in (("full", "early") if r % 2 == 0 else ("early", "full")):
            sync()
            t0 = clock()
            out = _run_early_exit(model, ids, lengths, batch, device, **(full if name == "full" else early))
            sync()
            cost[name] = max(clock() - t0, 1e-9)
            if name == "early":
                z, layer = out
        ratios.append(cost["full"] / cost["early"])
        fulls.append(cost["full"])
    return statistics.median(ratios), statistics.median(fulls), z, layer


def speedup_note(speedup, avg_exit_layer, depth):
    """``"*"`` when a measured speed-up exceeds what the layers allow (``depth / avg_exit_layer``, by 5%): the
    figure is timing noise, not a speed-up; ``""`` otherwise."""
    return "*" if speedup > 1.05 * depth / avg_exit_layer else ""


def chance_warning(exit_logits, labels):
    """The report's line naming the off-ramps at chance (``calibration.exits_at_chance``), or None."""
    from ..calibration import exits_at_chance

    at_chance, chance = exits_at_chance(exit_logits, labels)
    if not at_chance:
        return None
    many = len(at_chance) > 1
    return (f"warning: off-ramp{'s' if many else ''} {', '.join(map(str, at_chance))} {'are' if many else 'is'} at "
            f"chance (accuracy at most the majority class's share, {chance:.4f}): "
            f"{'their' if many else 'its'} exits are guesses")


NOISE_FOOTNOTE = ("* above the bound the layers set (full depth / average exit layer): timing noise on a busy "
                  "machine, not a real speed-up")


def _candidates(exit_logits, criterion, depth):
    """Thresholds at quantiles of the early off-ramps' scores, so each lets a different share of samples out."""
    from .. import reference

    if criterion == "patience":
        return list(range(depth - 1, 0, -1))  # the latest exits first, as for the thresholds
    flat = exit_logits[:-1].reshape(-1, exit_logits.shape[-1]).double()
    if flat.numel() == 0:
        return []
    scores = reference.exit_entropy(flat) if criterion == "entropy" else reference.exit_max_prob(flat)
    scores = scores[torch.isfinite(scores)]
    if scores.numel() == 0:
        return []
    qs = torch.tensor([0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9], dtype=torch.float64)
    values = torch.quantile(scores.cpu(), qs).unique().tolist()
    if criterion == "entropy":  # exit when entropy < t: a zero threshold is refused and would exit nobody
        return sorted({v for v in values if v > 0})
    return sorted({min(1.0, v) for v in values if v > 0}, reverse=True)  # max_prob: earliest exits last


def _score(logits, y, regression):
    """Accuracy (classification) or mean squared error (a one-output regression head) of ``logits [B, C]``."""
    if regression:
        return float(((logits[:, 0].double() - y.double()) ** 2).mean())
    return float((logits.argmax(-1) == y).double().mean())


def evaluate(a, model, ids, lengths, y, device, log):
    """Every exit's accuracy, the full-depth accuracy and the measured batched early exit at each threshold: the
    report dict. For ``--regression`` the scores are mean squared errors (lower is better)."""
    from ..calibration import speed_accuracy_curve

    depth = model.config.num_hidden_layers
    batch = a.eval_batch_size
    y_d = y.to(device)
    metric = "mse" if a.regression else "accuracy"
    with torch.no_grad():
        exits = torch.cat([model(*_batches(ids, lengths, torch.arange(s, min(s + batch, ids.shape[0])),
                                           device)).exit_logits for s in range(0, ids.shape[0], batch)], 1)
    per_exit = [_score(exits[i], y_d, a.regression) for i in range(depth)]
    log(f"\nevery exit on {ids.shape[0]} eval examples ({metric}):")
    log("  " + " ".join(f"{'exit ' + str(i + 1):>8}" for i in range(depth)))
    log("  " + " ".join(f"{v:8.4f}" for v in per_exit))
    # full depth through the same batched loop: patience 0 is PABEE's (and threshold 0 DeeBERT's) full-depth row
    full = dict(criterion="patience", patience=0)
    if a.regression:
        full["threshold"] = a.regression_delta
    _run_early_exit(model, ids[:batch], lengths[:batch], batch, device, **full)  # warm-up
    z_full, l_full = _run_early_exit(model, ids, lengths, batch, device, **full)
    assert bool((l_full == depth).all())
    acc_full = _score(z_full, y_d, a.regression)
    rows = [dict(threshold=None, avg_exit_layer=float(depth), layers_saved=0.0, speedup=1.0, speedup_bound=1.0,
                 above_bound=False, accuracy=acc_full, delta=0.0, seconds=None)]
    for t in _candidates(exits, a.criterion, depth):
        kw = dict(patience=int(t)) if a.criterion == "patience" else dict(threshold=float(t))
        if a.regression:
            kw["threshold"] = a.regression_delta  # PABEE's rule for a regression head: |change| < delta
        speed, t_full, z, layer = paired_speedup(model, ids, lengths, batch, device, full,
                                                 dict(criterion=a.criterion, **kw))
        acc = _score(z, y_d, a.regression)
        avg = float(layer.double().mean())
        rows.append(dict(threshold=t, avg_exit_layer=avg, layers_saved=1 - avg / depth, speedup=speed,
                         speedup_bound=depth / avg, above_bound=bool(speedup_note(speed, avg, depth)),
                         accuracy=acc, delta=acc - acc_full, seconds=t_full / speed))
        rows[0]["seconds"] = t_full
    curve = speed_accuracy_curve(exits, y_d, criterion=a.criterion) if depth > 1 and not a.regression else None
    log(f"\nbatched early exit on {ids.shape[0]} eval examples ({a.criterion}, {depth} layers, batches of {batch}):")
    log(f"  {'threshold':>9} {'avg exit':>9} {'layers saved':>13} {'speed-up':>9} {metric:>9} {'vs full':>8}")
    for r in rows:
        t = "full" if r["threshold"] is None else (f"{r['threshold']:d}" if a.criterion == "patience"
                                                   else f"{r['threshold']:.5g}")
        log(f"  {t:>9} {r['avg_exit_layer']:9.2f} {r['layers_saved']:12.1%} {r['speedup']:8.2f}x "
            f"{r['accuracy']:9.4f} {r['delta']:+8.4f}{'  *' if r['above_bound'] else ''}")
    log(f"  (speed-up: {'wall' if device.type == 'cuda' else 'CPU'} time of the batched full-depth pass over the "
        f"early-exit pass, the median of {TIMING_ROUNDS} interleaved pairs)")
    if any(r["above_bound"] for r in rows):
        log("  " + NOISE_FOOTNOTE)
    warning = None if a.regression else chance_warning(exits, y_d)
    if warning:
        log("  " + warning)
    return {"criterion": a.criterion, "num_layers": depth, "num_examples": int(ids.shape[0]),
            "device": str(device), "metric": metric, "per_exit_accuracy": per_exit,
            "full_depth_accuracy": acc_full, "rows": rows,
            "offline_curve": None if curve is None else {k: v.tolist() for k, v in curve.items()}}


def plot(path, losses, report):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(losses, lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("Multi-exit fine-tuning")
    rows = report["rows"]
    if report["offline_curve"] is not None:
        c = report["offline_curve"]
        right.plot(c["speedup"], c["accuracy"], ".-", lw=1, label="layer speed-up (offline)")
    right.plot([r["speedup"] for r in rows[1:]], [r["accuracy"] for r in rows[1:]], "o",
               label="measured batched early exit")
    right.axhline(report["full_depth_accuracy"], color="gray", ls="--", lw=1, label="full depth")
    right.set_xlabel(f"speed-up over {report['num_layers']} layers")
    right.set_ylabel("accuracy")
    right.set_title(f"Early exit: speed vs accuracy ({report['criterion']})")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------- cli


def build_parser():
    p = argparse.ArgumentParser(prog="effbert finetune", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data and model")
    d.add_argument("--train", required=True, metavar="TSV", help="training examples, label<TAB>text a line")
    d.add_argument("--eval", metavar="TSV", help="held-out examples for the accuracy and early-exit report")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--init", metavar="DIR", help="an effbert pretrain output folder")
    src.add_argument("--hf", metavar="DIR", help="a local Hugging Face BERT folder (config, weights, vocab.txt)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder for the fine-tuned model and the report "
                   "(new or empty)")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier effbert finetune run in --out (never "
                   "another kind of folder)")
    d.add_argument("--max-len", type=int, default=128, help="longest input in pieces, [CLS] and [SEP] included")
    d.add_argument("--cased", action="store_true", default=None,
                   help="keep case and accents (default: as the checkpoint's tokenizer, else lowercase)")
    o = p.add_argument_group("training")
    o.add_argument("--epochs", type=float, default=3.0, help="passes over --train (unless --steps)")
    o.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW)")
    o.add_argument("--warmup", type=float, default=0.1, help="share of the steps with a linear warm-up; then "
                   "linear decay to 0")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    o.add_argument("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    o.add_argument("--recipe", help="a paper's published settings for the flags not given: deebert, pabee or "
                   "romebert (docs/finetune.md lists each value and its source)")
    o.add_argument("--loss", choices=LOSSES, default="romebert",
                   help="romebert: joint training with self-distillation from the last exit (RomeBERT); pabee: "
                   "layer-weighted loss (PABEE); deebert: two stages, backbone then off-ramps (DeeBERT)")
    o.add_argument("--gamma", type=float, default=0.9, help="RomeBERT: weight of the distillation term "
                   "(RomeBERT's published value)")
    o.add_argument("--temperature", type=float, default=3.0, help="RomeBERT: distillation temperature "
                   "(RomeBERT's published value)")
    o.add_argument("--grad-reg", action="store_true", help="RomeBERT's gradient regularization (--gp): one "
                   "projection of the concatenated gradients of every layer but the last")
    o.add_argument("--project", choices=PROJECT, default="others", help="with --grad-reg, the side projected: "
                   "others (the other exits' gradient off the last exit's: RomeBERT on MNLI/QQP) or final (the "
                   "reverse: RomeBERT on the other GLUE tasks)")
    o.add_argument("--ge", action="store_true", help="RomeBERT's gradient equilibrium: exit i's gradient scaled "
                   "by 1/(L - i), the forward unchanged")
    o.add_argument("--shared-pooler", action="store_true", help="one pooler shared by every off-ramp (PABEE); by "
                   "default each off-ramp has its own, copied from the checkpoint's (DeeBERT, RomeBERT)")
    o.add_argument("--regression", action="store_true", help="labels are numbers: a one-output head trained "
                   "with mean squared error (PABEE's layer-weighted MSE, or DeeBERT's per-stage MSE); the report "
                   "gives MSE instead of accuracy")
    o.add_argument("--regression-delta", type=float, default=0.1, help="with --regression and --criterion "
                   "patience: a prediction counts as unchanged when it moves by less than this (PABEE's rule)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--backend", default=None, help="effbert op backend (default: auto; eager under the Triton "
                   "interpreter)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch-size per optimizer step "
                   "(Trainer's gradient_accumulation_steps)")
    prec = o.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 mixed precision with loss scaling (CUDA)")
    prec.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    o.add_argument("--save-steps", type=int, default=0, help="keep a checkpoint every N steps in DIR/checkpoints "
                   "(0: none); --resume continues from the latest")
    o.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (the oldest go)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out from its newest complete "
                   "checkpoint (the same command line, plus --resume)")
    o.add_argument("--reshape-schedule", action="store_true", help="with --resume and more --steps (or --epochs): "
                   "stretch the learning-rate schedule to them (default: keep the run's)")
    o.add_argument("--log-every", type=int, default=50, help="print the mean loss every N steps")
    o.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a "
                   "terminal)")
    e = p.add_argument_group("early-exit report")
    e.add_argument("--criterion", choices=CRITERIA, default="entropy")
    e.add_argument("--eval-batch-size", type=int, default=128)
    return p


def _check_args(a):
    from ..ops._dispatch import BACKENDS

    _fail_if(a.steps is not None and a.steps < 1, f"--steps must be >= 1, got {a.steps}")
    _fail_if(not (a.epochs > 0 and math.isfinite(a.epochs)), f"--epochs must be > 0, got {a.epochs}")
    _fail_if(a.batch_size < 1, f"--batch-size must be >= 1, got {a.batch_size}")
    _fail_if(a.eval_batch_size < 1, f"--eval-batch-size must be >= 1, got {a.eval_batch_size}")
    _fail_if(not (a.lr > 0 and math.isfinite(a.lr)), f"--lr must be > 0, got {a.lr}")
    _fail_if(not 0 <= a.warmup < 1, f"--warmup must be in [0, 1), got {a.warmup}")
    _fail_if(not a.weight_decay >= 0, f"--weight-decay must be >= 0, got {a.weight_decay}")
    check_optimizer_flags(a)
    _fail_if(not 0 <= a.gamma <= 1, f"--gamma must be in [0, 1], got {a.gamma}")
    _fail_if(not (a.temperature > 0 and math.isfinite(a.temperature)),
             f"--temperature must be > 0, got {a.temperature}")
    _fail_if(a.grad_reg and (a.loss != "romebert" or a.regression),
             "--grad-reg goes with --loss romebert (classification)")
    _fail_if(a.regression and a.criterion != "patience",
             "--regression needs --criterion patience (entropy and max_prob need classes)")
    _fail_if(not (a.regression_delta > 0 and math.isfinite(a.regression_delta)),
             f"--regression-delta must be > 0, got {a.regression_delta}")
    _fail_if(a.max_len < 3, f"--max-len must be >= 3, got {a.max_len}")
    _fail_if(a.log_every < 1, f"--log-every must be >= 1, got {a.log_every}")
    _fail_if(a.grad_accum < 1, f"--grad-accum must be >= 1, got {a.grad_accum}")
    _fail_if(a.save_steps < 0, f"--save-steps must be >= 0, got {a.save_steps}")
    _fail_if(a.reshape_schedule and not a.resume, "--reshape-schedule goes with --resume")
    _fail_if(a.save_total_limit < 1, f"--save-total-limit must be >= 1, got {a.save_total_limit}")
    _fail_if(a.grad_reg and int(os.environ.get("WORLD_SIZE", "1")) > 1,
             "--grad-reg runs on one process: its two backward passes bypass data-parallel gradient averaging")
    _fail_if(a.backend is not None and a.backend not in ("auto",) + BACKENDS,
             f"--backend must be one of {('auto',) + BACKENDS}, got {a.backend!r}")
    device = parse_device(a.device)
    check_backend(a.backend, device)
    _fail_if(a.fp16 and device.type != "cuda", "--fp16 needs a CUDA device (--bf16 runs on a CPU)")
    _check_out(a)


# the files a finetune run writes (and those of its earlier layout): another run's (or anything's) are never
# overwritten
_OUT_FILES = (CONFIG_FILE, SETTINGS_FILE, REPORT_FILE, PLOT_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
              CHECKPOINTS) + WEIGHT_FILES + ("model.pt", "labels.json", VOCAB_FILE)
# what a run writes at the top of --out (save_pretrained's files included): anything else is not ours
_WRITES = _OUT_FILES + ("special_tokens_map.json",)


def _check_out(a):
    """``--out`` is refused before any work when it is the model's source or holds what this command would
    overwrite (a pretraining run, an earlier fine-tuning run without --overwrite, a file of the same name)."""
    check_out_dir(a.out)
    if not _main_process():  # under torchrun the first process checks (and later writes) --out
        return
    source = a.init if a.init is not None else a.hf
    if source is not None and os.path.isdir(source) and os.path.isdir(a.out) \
            and os.path.samefile(source, a.out):
        raise UsageError(f"--out {a.out!r} is the folder of {'--init' if a.init else '--hf'}: fine-tuning would "
                         "overwrite the model it starts from; choose another --out")
    folder = RunFolder(a.out, "effbert finetune", _WRITES, checkpoint_root=os.path.join(a.out, CHECKPOINTS))
    if not os.path.isdir(a.out):
        _fail_if(a.resume, f"--resume: {a.out!r} does not exist: there is no run to resume")
        a.run_folder = folder.lock()  # held until the run ends; released at once if it stops before writing
        return
    a.run_folder = folder.lock()
    held = [n for n in _OUT_FILES + ("pretrain.json",) if os.path.exists(os.path.join(a.out, n))]
    if not held:
        _fail_if(a.resume, f"--resume: {a.out!r} holds no effbert finetune run")
        folder.refuse_foreign()  # new or empty, as the docs say: the user's own files stay theirs
        return
    if os.path.exists(os.path.join(a.out, "pretrain.json")):
        raise UsageError(f"--out: {a.out!r} holds an effbert pretrain run; choose another folder")
    if not os.path.isfile(os.path.join(a.out, SETTINGS_FILE)):
        raise UsageError(f"--out: {a.out!r} holds {', '.join(held)} of something else; choose another folder")
    folder.refuse_foreign()
    if a.resume:
        _fail_if(not any(newest_complete(d) for d in (os.path.join(a.out, CHECKPOINTS),
                                                        os.path.join(a.out, CHECKPOINTS, "stage-1"))),
                 f"--resume: {a.out!r} holds no checkpoint (--save-steps keeps them)")
        return
    if not a.overwrite:
        raise UsageError(f"--out: {a.out!r} holds an earlier effbert finetune run; pass --overwrite to replace it "
                         "(or --resume to continue it) or choose another folder")


def _check_same_train(a):
    """--resume on the --train file the run started with (a run of an older version recorded none)."""
    path = os.path.join(a.out, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        recorded = saved.get("train_data")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise UsageError(f"--resume: cannot read {path!r} ({_one_line(exc, 200)}); the run folder is damaged") from None
    check_same_data("--train", None if recorded is None else [recorded], [a.train], a.out)


def run(a, log):
    """The whole command; returns ``(model, report or None)``."""
    t0 = time.perf_counter()
    device = parse_device(a.device)
    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device)  # Trainer trains on the current CUDA device
    backend = a.backend if a.backend not in (None, "auto") else _default_backend(device)
    from ..integrations.hf import _transformers

    try:
        transformers = _transformers()
        import datasets
    except ImportError as exc:  # regular dependencies, but an install can lack them: the message says how
        raise UsageError(" ".join(str(exc).split())) from None
    if not _show_progress(a):  # nor the libraries' bars (loading weights, tokenizing, saving)
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(a.seed)
    train_names, train_texts = read_tsv(a.train, "--train")
    if a.resume and _main_process():
        _check_same_train(a)
    if a.regression:  # numeric labels: no classes to check
        labels = ["value"]
        targets = _numbers(train_names, "--train")
    else:
        check_labels(train_names, train_texts, a.train, "--train",
                     warn=lambda msg: print(f"effbert finetune: warning: {msg}", file=sys.stderr, flush=True))
        labels = sorted(set(train_names))
        _fail_if(len(labels) < 2, f"--train: every example has the label {labels[0]!r}; classification needs two")
    index = {name: i for i, name in enumerate(labels)}
    eval_data = None
    if a.eval is not None:
        eval_names, eval_texts = read_tsv(a.eval, "--eval")
        if a.regression:
            _numbers(eval_names, "--eval")
        else:
            unknown = sorted(set(eval_names) - set(labels))
            _fail_if(unknown, f"--eval: labels {unknown[:5]} do not occur in --train")
        eval_data = (eval_names, eval_texts)
    if a.hf is not None:
        model, tokenizer, cased = _from_hf(a.hf, len(labels), backend, a.cased, a.shared_pooler)
    else:
        model, tokenizer, cased = _from_pretrain(a.init, len(labels), backend, a.cased, a.shared_pooler)
    source = "--hf" if a.hf is not None else "--init"
    _fail_if(len(tokenizer) > model.config.vocab_size, f"{source}: the tokenizer has {len(tokenizer)} pieces, more "
             f"than the model's vocab_size {model.config.vocab_size}")
    max_len = min(a.max_len, model.config.max_position_embeddings)
    model.set_backend(backend)
    _training_args(a, os.path.join(a.out, CHECKPOINTS), device, 1)  # its mistakes (e.g. --fp16 on a CPU) first
    y = targets if a.regression else torch.tensor([index[n] for n in train_names], dtype=torch.int64)
    train_ds = _dataset(tokenizer, train_texts, y, max_len)
    settings = {"cased": cased, "max_len": max_len, "loss": a.loss, "gamma": a.gamma, "temperature": a.temperature,
                "grad_reg": a.grad_reg, "project": a.project, "ge": a.ge, "shared_pooler": a.shared_pooler,
                "regression": a.regression, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "lr": a.lr,
                "seed": a.seed, "init": a.init, "hf": a.hf, "train": a.train, "recipe": a.recipe,
                "adam_beta1": a.adam_beta1, "adam_beta2": a.adam_beta2, "adam_epsilon": a.adam_epsilon,
                "max_grad_norm": a.max_grad_norm, "weight_decay": a.weight_decay, "warmup": a.warmup,
                # what a resume checks it is given again (run_folder.fingerprint: size and the ends' SHA-256)
                "train_data": fingerprint(a.train)}
    if not _main_process():  # under torchrun one process speaks and writes
        log = lambda msg: None  # noqa: E731
    else:
        if a.overwrite and not a.resume:  # the earlier run's checkpoints (--out holds a finetune run: checked)
            shutil.rmtree(os.path.join(a.out, CHECKPOINTS), ignore_errors=True)
        os.makedirs(a.out, exist_ok=True)
        # written first, so that an interrupted run's folder is known as this command's and can be resumed
        atomic_write(json.dumps(dict(settings, complete=False), indent=2, sort_keys=True) + "\n",
                     os.path.join(a.out, SETTINGS_FILE))
        log(f"effbert finetune on {device}: {len(train_texts)} training examples, labels {labels}, "
            f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}")
    def distributed():
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    try:
        model, losses, trainer = train(a, model, tokenizer, train_ds, device, backend, log)
        if distributed():
            torch.distributed.barrier()  # every process is here before any leaves the group
    finally:
        # every process leaves the group once training is over, as pretrain does: a process that exited with its
        # group alive while the first one still saved and evaluated aborted at its shutdown under torchrun
        if distributed():
            torch.distributed.destroy_process_group()
    if not _main_process():  # (the process group is gone: Trainer is not asked)
        return model, None
    model = model.to(device)
    settings.update(steps=len(losses), complete=True)
    save_finetuned(a.out, model, tokenizer, labels, settings)
    log(f"model saved to {os.path.abspath(a.out)} ({CONFIG_FILE}, {WEIGHT_FILES[0]}, {TOKENIZER_FILE}, "
        f"{SETTINGS_FILE}); AutoModelForSequenceClassification.from_pretrained loads it")
    report = None
    if eval_data is not None:
        e_ids, e_len = _encode(tokenizer, eval_data[1], max_len)
        e_y = _numbers(eval_data[0], "--eval") if a.regression else \
            torch.tensor([index[n] for n in eval_data[0]], dtype=torch.int64)
        report = evaluate(a, model, e_ids, e_len, e_y, device, log)
        k = max(1, len(losses) // 10)
        report.update(labels=labels, train_steps=len(losses), train_loss_first=sum(losses[:k]) / k,
                      train_loss_last=sum(losses[-k:]) / k, losses=losses)
        atomic_write(json.dumps(report, indent=2) + "\n", os.path.join(a.out, REPORT_FILE))
        path = os.path.abspath(os.path.join(a.out, PLOT_FILE))
        log(f"\nreport: {os.path.abspath(os.path.join(a.out, REPORT_FILE))}")
        log(f"plot (loss, speed-accuracy): {path}" if plot(path, losses, report)
            else "matplotlib is not installed: no plot written (pip install matplotlib)")
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return model, report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("effbert finetune", build_parser(), checker("finetune", build_parser, argv, _check_args),
                       run, argv)


if __name__ == "__main__":
    sys.exit(main())
