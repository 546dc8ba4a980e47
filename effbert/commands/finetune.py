"""``effbert finetune``: multi-exit classification on a user's own labelled text, then a speed-accuracy report of
batched early exit over exit thresholds.

    effbert finetune --hf ./bert-base-uncased --train train.tsv --eval dev.tsv --out run/
    effbert finetune --init pretrain-run/ --train train.tsv --eval dev.tsv --out run/ --epochs 3

Data: one example a line, ``label<TAB>text``; labels are strings, given ids in sorted order (saved in
``labels.json``); with ``--regression`` they are numbers and the head has one output (MSE). The encoder comes from an
``effbert pretrain`` folder (``--init``) or a local Hugging Face BERT folder (``--hf``: its ``config.json``,
``model.safetensors`` and ``vocab.txt``); an off-ramp (pooler and classifier) follows every layer, every off-ramp's
pooler starting from the checkpoint's pooler (DeeBERT, RomeBERT) or sharing one (``--shared-pooler``, PABEE).
Training: RomeBERT's self-distillation loss (``--loss romebert``, gamma 0.9 and T 3 as published, with
``--grad-reg``/``--project`` and ``--ge``), PABEE's layer-weighted loss (``--loss pabee``) or DeeBERT's two stages
(``--loss deebert``). docs/finetune.md says which published setting each option reproduces.

On ``--eval``: every exit's accuracy (MSE for ``--regression``), then for a range of thresholds of ``--criterion`` the
batched early exit's
average exit layer, layers saved, measured speed-up (wall time against a full-depth pass of the same batched loop)
and accuracy, printed as a table and written to ``DIR/report.json`` and ``DIR/report.png`` (with matplotlib).
``DIR`` holds the fine-tuned model (``config.json``, ``model.pt``, ``labels.json``, ``vocab.txt``,
``finetune.json``); ``load_finetuned(DIR)`` loads it back for ``model.early_exit``.
"""

import argparse
import glob
import json
import math
import os
import pickle
import sys
import time

import torch

from . import UsageError, check_backend, check_out_dir, parse_device, run_command

__all__ = ["main", "load_finetuned", "read_tsv", "UsageError"]

CONFIG_FILE, MODEL_FILE, LABELS_FILE, VOCAB_FILE, SETTINGS_FILE, REPORT_FILE, PLOT_FILE = (
    "config.json", "model.pt", "labels.json", "vocab.txt", "finetune.json", "report.json", "report.png")
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
    ids, lengths = tokenizer.encode_batch(texts, max_len)
    return ids, lengths


def _batches(ids, lengths, rows, device):
    """One batch cut to its longest row: ``(ids [b, n], attention mask [b, n] bool)`` on ``device``."""
    b_len = lengths[rows]
    n = int(b_len.max())
    mask = torch.arange(n)[None] < b_len[:, None]
    return ids[rows, :n].to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------- model


def _default_backend(device):
    # On the CPU the Triton interpreter (TRITON_INTERPRET=1) is a correctness tool, far too slow to train with.
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "eager"
    return "auto"


def _classifier_from(encoder_model, config, num_labels, pooler=None, classifier=None, shared_pooler=False):
    """A multi-exit ``TupeBertForSequenceClassification`` with ``encoder_model``'s embeddings and layers. Every
    off-ramp's pooler starts from ``pooler`` (a state dict) when given, else from the last off-ramp's fresh one, as
    DeeBERT and RomeBERT copy the pooler into every off-ramp (``shared_pooler``: one pooler for all, PABEE); the last
    off-ramp's classifier starts from ``classifier`` when given."""
    from ..models import TupeBertConfig, TupeBertForSequenceClassification

    values = config.to_dict()
    values.update(multi_exit=True, num_labels=num_labels, shared_exit_pooler=bool(shared_pooler))
    model = TupeBertForSequenceClassification(TupeBertConfig.from_dict(values))
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
    from ..integrations.hf import from_hf_bert
    from ..models import TupeBertForSequenceClassification, TupeBertModel
    from ..data.text import WordPieceTokenizer

    _fail_if(not os.path.isdir(path), f"--hf: {path!r} is not a folder (a local Hugging Face BERT checkpoint)")
    _fail_if(not os.path.isfile(os.path.join(path, VOCAB_FILE)), f"--hf: {path!r} holds no {VOCAB_FILE}")
    try:
        hf = from_hf_bert(path, backend=backend)
    except (ValueError, OSError, ImportError) as exc:  # ImportError: transformers missing, the message says how
        raise UsageError(f"--hf: {exc}") from exc
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
    if cased is None:  # what the checkpoint's tokenizer says, else BERT's default (uncased)
        cased = False
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg):
            with open(cfg, encoding="utf-8") as f:
                cased = not json.load(f).get("do_lower_case", True)
    tokenizer = WordPieceTokenizer.from_file(path, lowercase=not cased)
    return (_classifier_from(encoder, encoder.config, num_labels, pooler, classifier, shared_pooler), tokenizer,
            cased)


def _from_pretrain(path, num_labels, backend, cased, shared_pooler=False):
    _fail_if(not os.path.isdir(path), f"--init: {path!r} is not a folder (an effbert pretrain output)")
    try:
        from .pretrain import load_pretrained
    except ImportError:  # an install without the pretraining command: read its folder layout directly
        load_pretrained = _read_pretrain_folder
    try:
        mlm, tokenizer, _ = load_pretrained(path, backend=backend)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise UsageError(f"--init: {' '.join(str(exc).split())[:400]}") from None
    if cased is not None and cased != (not tokenizer.lowercase):
        raise UsageError(f"--cased {'given' if cased else 'not given'}, but the pretraining run "
                         f"{'lowercased' if tokenizer.lowercase else 'kept case'}")
    # TNF's notes help pretraining only: fine-tuning runs the plain encoder (as the TNF paper does)
    return (_classifier_from(mlm.bert, mlm.config, num_labels, shared_pooler=shared_pooler), tokenizer,
            not tokenizer.lowercase)


def _read_pretrain_folder(path, backend="auto"):
    """The encoder of an ``effbert pretrain`` folder (``config.json``, ``vocab.txt``, ``pretrain.json`` and the final
    ``model.pt`` or the latest ``checkpoint-*.pt``), as ``(TupeBertForMaskedLM without notes, tokenizer, None)``."""
    from ..models import TupeBertConfig, TupeBertForMaskedLM
    from ..data.text import WordPieceTokenizer

    for name in (CONFIG_FILE, VOCAB_FILE, "pretrain.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path!r} holds no {name}: not the folder of an effbert pretrain run")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config = TupeBertConfig.from_json(f.read())
    config.backend = backend
    with open(os.path.join(path, "pretrain.json"), encoding="utf-8") as f:
        cased = bool(json.load(f).get("settings", {}).get("cased", False))
    final = os.path.join(path, MODEL_FILE)
    if os.path.isfile(final):
        state = torch.load(final, map_location="cpu", weights_only=True)
    else:
        ckpts = sorted(glob.glob(os.path.join(path, "checkpoint-*.pt")))
        if not ckpts:
            raise FileNotFoundError(f"{path!r} holds neither {MODEL_FILE} nor a checkpoint")
        ckpt = torch.load(ckpts[-1], map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        state = ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{ckpts[-1]!r} is not a checkpoint of effbert pretrain (no model state)")
    state = {k: v for k, v in state.items() if not k.startswith("notes.")}  # TNF's notes serve pretraining only
    config.tnf_num_notes = None
    model = TupeBertForMaskedLM(config)
    model.load_state_dict(state)
    return model.eval(), WordPieceTokenizer.from_file(os.path.join(path, VOCAB_FILE), lowercase=not cased), None


def save_finetuned(out, model, tokenizer, labels, settings):
    os.makedirs(out, exist_ok=True)
    config = dict(model.config.to_dict(), backend="auto")  # the run's backend belongs to the run, not the model
    _write(os.path.join(out, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp = os.path.join(out, MODEL_FILE + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(out, MODEL_FILE))
    _write(os.path.join(out, LABELS_FILE), json.dumps(list(labels), indent=2) + "\n")
    tokenizer.save(os.path.join(out, VOCAB_FILE))
    _write(os.path.join(out, SETTINGS_FILE), json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # a reader never sees half a file


def load_finetuned(path, device=None, backend="auto"):
    """A model ``effbert finetune`` wrote to ``path``: ``(TupeBertForSequenceClassification with off-ramps, in
    eval mode; WordPieceTokenizer; labels, a list of str indexed by class id; settings dict, with max_len)``.
    Raises ``FileNotFoundError`` for a folder that is not such a run and ``ValueError`` for weights that cannot be
    read with ``torch.load(..., weights_only=True)``."""
    from ..models import TupeBertConfig, TupeBertForSequenceClassification
    from ..data.text import WordPieceTokenizer

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path must be the folder of an effbert finetune run, got {path!r}")
    path = os.fspath(path)
    for name in (CONFIG_FILE, MODEL_FILE, LABELS_FILE, VOCAB_FILE, SETTINGS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"path: {path!r} holds no {name}: not the folder of an effbert finetune run")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config = TupeBertConfig.from_json(f.read())
    config.backend = backend
    with open(os.path.join(path, LABELS_FILE), encoding="utf-8") as f:
        labels = json.load(f)
    with open(os.path.join(path, SETTINGS_FILE), encoding="utf-8") as f:
        settings = json.load(f)
    if len(labels) != config.num_labels:
        raise ValueError(f"path: {LABELS_FILE} lists {len(labels)} labels, the config says {config.num_labels}")
    model = TupeBertForSequenceClassification(config)
    weights = os.path.join(path, MODEL_FILE)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only: nothing else unpickled
    except Exception as exc:  # a cut, tampered or foreign file
        raise ValueError(f"path: cannot read {weights!r} ({' '.join(str(exc).split())[:300]})") from None
    model.load_state_dict(state)
    if device is not None:
        model = model.to(device)
    tokenizer = WordPieceTokenizer.from_file(os.path.join(path, VOCAB_FILE), lowercase=not settings["cased"])
    return model.eval(), tokenizer, labels, settings


# -------------------------------------------------------------------------------------------------- training


def _progress(total, desc, quiet):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, disable=quiet, dynamic_ncols=True, file=sys.stdout)


def _loss(a, exit_logits, labels, backend, stage=1):
    from ..losses import deebert_loss, multi_exit_distillation_loss, pabee_loss

    z = exit_logits.float()
    if a.loss == "deebert":
        return deebert_loss(z, labels, stage, gradient_equilibrium=a.ge)
    if a.loss == "pabee" or a.regression:  # a regression head: PABEE's layer-weighted MSE (HF: MSE for 1 output)
        return pabee_loss(z, labels, gradient_equilibrium=a.ge)
    return multi_exit_distillation_loss(z, labels, gamma=a.gamma, temperature=a.temperature,
                                        gradient_equilibrium=a.ge, backend=backend)


def _set_deebert_stage(model, stage):
    """DeeBERT's stage 2 freezes the backbone and the final classifier: only the other off-ramps learn."""
    frozen = stage == 2
    model.bert.requires_grad_(not frozen)
    last = model.exits[-1]
    last.requires_grad_(not frozen)
    for head in list(model.exits)[:-1]:
        for p in head.parameters():
            p.requires_grad_(not (frozen and any(p is q for q in last.parameters())))


def train(a, model, ids, lengths, y, device, backend, log):
    """Fine-tunes ``model`` in place; DeeBERT's loss runs its two stages, ``a.steps`` (or epochs) each."""
    if a.loss != "deebert":
        return _train_stage(a, model, ids, lengths, y, device, backend, log)
    _set_deebert_stage(model, 1)
    log("DeeBERT stage 1: the backbone and the final classifier on the last exit's loss")
    _, first = _train_stage(a, model, ids, lengths, y, device, backend, log, stage=1)
    _set_deebert_stage(model, 2)
    log("DeeBERT stage 2: backbone and final classifier frozen, the off-ramps on the sum of their losses")
    model.train()
    _, second = _train_stage(a, model, ids, lengths, y, device, backend, log, stage=2)
    _set_deebert_stage(model, 1)  # unfrozen again for whoever trains it next
    return model.eval(), first + second


def _train_stage(a, model, ids, lengths, y, device, backend, log, stage=1):
    from ..losses import gradient_regularized_backward, romebert_projected_parameters

    gen = torch.Generator().manual_seed(a.seed + stage - 1)
    count = ids.shape[0]
    per_epoch = math.ceil(count / a.batch_size)
    steps = a.steps if a.steps is not None else max(1, math.ceil(a.epochs * per_epoch))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)  # no weight decay on biases and LayerNorms, as BERT
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    warmup = int(round(a.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    what = {"romebert": f"romebert (gamma {a.gamma}, temperature {a.temperature}"
                        + (f", gradient projection of the {a.project} side" if a.grad_reg else "") + ")",
            "pabee": "pabee", "deebert": f"deebert stage {stage}"}[a.loss]
    if a.regression and a.loss == "romebert":
        what = "pabee's mean squared error (a regression head)"
    log(f"fine-tuning {model.config.num_hidden_layers} off-ramps, "
        + ("a regression head" if a.regression else f"{model.config.num_labels} labels")
        + f", {count} examples: {steps} steps of {a.batch_size} ({steps / per_epoch:.2f} epochs), loss {what}"
        + (", gradient equilibrium" if a.ge else "") + f", backend {backend}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    reg_params = romebert_projected_parameters(model.bert.encoder) if a.grad_reg else None
    projected = torch.zeros((), dtype=torch.int64, device=device)
    bar = _progress(steps, "finetune" if a.loss != "deebert" else f"stage {stage}", a.quiet)
    write = bar.write if bar is not None else log
    losses, order = [], torch.empty(0, dtype=torch.int64)
    t0 = time.perf_counter()
    for step in range(steps):
        if order.numel() < a.batch_size:  # a fresh shuffle each epoch; the last partial batch joins the next
            order = torch.cat([order, torch.randperm(count, generator=gen)])
        rows, order = order[:a.batch_size], order[a.batch_size:]
        b_ids, mask = _batches(ids, lengths, rows, device)
        out = model(b_ids, mask)
        b_y = y[rows].to(device)
        loss = _loss(a, out.exit_logits, b_y, backend, stage)
        opt.zero_grad(set_to_none=True)
        if a.grad_reg:
            # the teacher is detached, so the last exit's only term is its cross-entropy: the rest is the others'
            # (gradient equilibrium scales the last exit by 1: its cross-entropy is the same either way)
            final = torch.nn.functional.cross_entropy(out.logits.float(), b_y)  # the last exit's
            projected += gradient_regularized_backward(final, loss - final, params, reg_params, project=a.project)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise UsageError(f"the loss is {losses[-1]} at step {step + 1}: lower --lr")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % a.log_every == 0 or step + 1 == steps:
            k = min(a.log_every, len(losses))
            write(f"  step {step + 1:6d}  loss {sum(losses[-k:]) / k:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    if bar is not None:
        bar.close()
    if a.grad_reg:
        log(f"gradient regularization: the {a.project} side projected on {int(projected)} of {steps} steps")
    log(f"trained in {time.perf_counter() - t0:.1f} s")
    return model.eval(), losses


# ---------------------------------------------------------------------------------------------------- report


def _timed_early_exit(model, ids, lengths, batch, device, **kw):
    logits, layers = [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(0, ids.shape[0], batch):
        b_ids, mask = _batches(ids, lengths, torch.arange(s, min(s + batch, ids.shape[0])), device)
        z, layer = model.early_exit(b_ids, mask, **kw)
        logits.append(z)
        layers.append(layer)
    sync()
    return torch.cat(logits), torch.cat(layers), time.perf_counter() - t0


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
    _timed_early_exit(model, ids[:batch], lengths[:batch], batch, device, **full)  # warm-up
    z_full, l_full, t_full = _timed_early_exit(model, ids, lengths, batch, device, **full)
    assert bool((l_full == depth).all())
    acc_full = _score(z_full, y_d, a.regression)
    rows = [dict(threshold=None, avg_exit_layer=float(depth), layers_saved=0.0, speedup=1.0, accuracy=acc_full,
                 delta=0.0, seconds=t_full)]
    for t in _candidates(exits, a.criterion, depth):
        kw = dict(patience=int(t)) if a.criterion == "patience" else dict(threshold=float(t))
        if a.regression:
            kw["threshold"] = a.regression_delta  # PABEE's rule for a regression head: |change| < delta
        z, layer, sec = _timed_early_exit(model, ids, lengths, batch, device, criterion=a.criterion, **kw)
        acc = _score(z, y_d, a.regression)
        avg = float(layer.double().mean())
        rows.append(dict(threshold=t, avg_exit_layer=avg, layers_saved=1 - avg / depth, speedup=t_full / sec,
                         accuracy=acc, delta=acc - acc_full, seconds=sec))
    curve = speed_accuracy_curve(exits, y_d, criterion=a.criterion) if depth > 1 and not a.regression else None
    log(f"\nbatched early exit on {ids.shape[0]} eval examples ({a.criterion}, {depth} layers, batches of {batch}):")
    log(f"  {'threshold':>9} {'avg exit':>9} {'layers saved':>13} {'speed-up':>9} {metric:>9} {'vs full':>8}")
    for r in rows:
        t = "full" if r["threshold"] is None else (f"{r['threshold']:d}" if a.criterion == "patience"
                                                   else f"{r['threshold']:.5g}")
        log(f"  {t:>9} {r['avg_exit_layer']:9.2f} {r['layers_saved']:12.1%} {r['speedup']:8.2f}x "
            f"{r['accuracy']:9.4f} {r['delta']:+8.4f}")
    log(f"  (speed-up: wall time of the batched full-depth pass, {t_full:.3f} s, over the early-exit pass)")
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
    o.add_argument("--log-every", type=int, default=50, help="print the mean loss every N steps")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
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
    _fail_if(a.backend is not None and a.backend not in ("auto",) + BACKENDS,
             f"--backend must be one of {('auto',) + BACKENDS}, got {a.backend!r}")
    check_backend(a.backend, parse_device(a.device))
    _check_out(a)


# the files a finetune run writes: another run's (or anything's) are never overwritten
_OUT_FILES = (CONFIG_FILE, MODEL_FILE, LABELS_FILE, VOCAB_FILE, SETTINGS_FILE, REPORT_FILE, PLOT_FILE)


def _check_out(a):
    """``--out`` is refused before any work when it is the model's source or holds what this command would
    overwrite (a pretraining run, an earlier fine-tuning run without --overwrite, a file of the same name)."""
    check_out_dir(a.out)
    source = a.init if a.init is not None else a.hf
    if source is not None and os.path.isdir(source) and os.path.isdir(a.out) \
            and os.path.samefile(source, a.out):
        raise UsageError(f"--out {a.out!r} is the folder of {'--init' if a.init else '--hf'}: fine-tuning would "
                         "overwrite the model it starts from; choose another --out")
    if not os.path.isdir(a.out):
        return
    held = [n for n in _OUT_FILES + ("pretrain.json",) if os.path.exists(os.path.join(a.out, n))]
    if not held:
        return
    if os.path.exists(os.path.join(a.out, "pretrain.json")):
        raise UsageError(f"--out: {a.out!r} holds an effbert pretrain run; choose another folder")
    if not os.path.isfile(os.path.join(a.out, SETTINGS_FILE)):
        raise UsageError(f"--out: {a.out!r} holds {', '.join(held)} of something else; choose another folder")
    if not a.overwrite:
        raise UsageError(f"--out: {a.out!r} holds an earlier effbert finetune run; pass --overwrite to replace it "
                         "or choose another folder")


def run(a, log):
    """The whole command; returns ``(model, report or None)``."""
    t0 = time.perf_counter()
    device = parse_device(a.device)
    backend = a.backend if a.backend not in (None, "auto") else _default_backend(device)
    torch.manual_seed(a.seed)
    train_names, train_texts = read_tsv(a.train, "--train")
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
    _fail_if(len(tokenizer) > model.config.vocab_size, f"{source}: vocab.txt has {len(tokenizer)} pieces, more than "
             f"the model's vocab_size {model.config.vocab_size}")
    max_len = min(a.max_len, model.config.max_position_embeddings)
    model.set_backend(backend)
    model = model.to(device)
    ids, lengths = _encode(tokenizer, train_texts, max_len)
    y = targets if a.regression else torch.tensor([index[n] for n in train_names], dtype=torch.int64)
    log(f"effbert finetune on {device}: {len(train_texts)} training examples, labels {labels}, "
        f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}")
    model, losses = train(a, model, ids, lengths, y, device, backend, log)
    settings = {"cased": cased, "max_len": max_len, "loss": a.loss, "gamma": a.gamma, "temperature": a.temperature,
                "grad_reg": a.grad_reg, "project": a.project, "ge": a.ge, "shared_pooler": a.shared_pooler,
                "regression": a.regression,
                "steps": len(losses), "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                "init": a.init, "hf": a.hf, "train": a.train}
    save_finetuned(a.out, model, tokenizer, labels, settings)
    log(f"model saved to {os.path.abspath(a.out)} ({CONFIG_FILE}, {MODEL_FILE}, {LABELS_FILE}, {VOCAB_FILE})")
    report = None
    if eval_data is not None:
        e_ids, e_len = _encode(tokenizer, eval_data[1], max_len)
        e_y = _numbers(eval_data[0], "--eval") if a.regression else \
            torch.tensor([index[n] for n in eval_data[0]], dtype=torch.int64)
        report = evaluate(a, model, e_ids, e_len, e_y, device, log)
        k = max(1, len(losses) // 10)
        report.update(labels=labels, train_steps=len(losses), train_loss_first=sum(losses[:k]) / k,
                      train_loss_last=sum(losses[-k:]) / k, losses=losses)
        _write(os.path.join(a.out, REPORT_FILE), json.dumps(report, indent=2) + "\n")
        path = os.path.abspath(os.path.join(a.out, PLOT_FILE))
        log(f"\nreport: {os.path.abspath(os.path.join(a.out, REPORT_FILE))}")
        log(f"plot (loss, speed-accuracy): {path}" if plot(path, losses, report)
            else "matplotlib is not installed: no plot written (pip install matplotlib)")
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return model, report


def main(argv=None):
    return run_command("effbert finetune", build_parser(), _check_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
