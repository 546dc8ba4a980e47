"""Multi-exit classifiers from checkpoints, and the folder ``effbert finetune`` writes.

- ``from_hf_folder``: a local Hugging Face BERT folder (``config.json``, ``model.safetensors``,
  ``vocab.txt`` or ``tokenizer.json``); a classifier checkpoint's head starts the last off-ramp.
- ``from_pretrain_folder``: an ``effbert pretrain`` output (a ``save_pretrained`` folder of
  ``TupeBertForMaskedLM`` with its tokenizer, or its newest complete ``checkpoint-N``); the
  masked-LM head and TNF's notes are left out (the TNF paper fine-tunes the plain encoder).
  ``hf_folder_tokenizer`` and ``multi_exit_from_pretrain_folder`` are their shared steps, which the
  token-classification task's start uses too.
- ``save_finetuned`` / ``load_finetuned``: ``save_pretrained`` of the model and tokenizer plus
  ``finetune.json``.
- ``load_pretrained``: the masked-LM model, its tokenizer and its rare-word table from an
  ``effbert pretrain`` run folder (the final model, or the newest complete checkpoint of a run
  still going).
- Trainer's ``checkpoint-N`` folders: which is complete (``newest_complete``), the rule the run
  folder's resume uses too.

Every off-ramp's pooler starts from the checkpoint's pooler (DeeBERT, RomeBERT copy it into each
off-ramp) or one pooler serves all (``shared_pooler``, PABEE). Errors are ``ValueError``
(``FileNotFoundError`` for a missing folder) whose one-line message names the flag the folder came
from.
"""

import fnmatch
import json
import os
import re

CONFIG_FILE, SETTINGS_FILE = "config.json", "finetune.json"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"
# save_pretrained's; the second from older checkpoints
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FILE_MODE = 0o644  # what every file of the run folder is written with

__all__ = [
    "from_hf_folder",
    "from_pretrain_folder",
    "hf_folder_tokenizer",
    "multi_exit_from_pretrain_folder",
    "save_finetuned",
    "load_finetuned",
    "load_tokenizer",
    "load_pretrained",
    "newest_checkpoint",
    "newest_complete",
    "check_model_folder",
    "read_lines",
    "WEIGHT_FILES",
    "SETTINGS_FILE",
    "RUN_FILE",
    "RARE_FILE",
    "CHECKPOINT_DIR",
]

# What Trainer writes into checkpoint-N, in its order: the model, optimizer, scheduler, RNG, state (last)
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "trainer_state.json",
)
MODEL_FILES = CHECKPOINT_FILES[:2]  # what loading the model alone needs


def _brief(exc, limit=300):
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def load_tokenizer(path, flag, cased=None):
    """``BertTokenizerFast`` of a folder (``tokenizer.json`` or ``vocab.txt``); ``cased`` None keeps
    the folder's casing. Raises ``ValueError`` naming ``flag`` when it is missing, does not load or
    lacks [PAD]/[CLS]/[SEP]."""
    from transformers import BertTokenizerFast

    if not any(os.path.isfile(os.path.join(path, n)) for n in (TOKENIZER_FILE, VOCAB_FILE)):
        raise ValueError(
            f"{flag}: {path!r} holds neither {TOKENIZER_FILE} nor {VOCAB_FILE} (the tokenizer)"
        )
    kw = {} if cased is None else {"do_lower_case": not cased}
    try:
        tok = BertTokenizerFast.from_pretrained(path, **kw)
    except Exception as exc:  # a damaged tokenizer.json / vocab.txt: whatever the library raises
        why = _brief(exc)
        raise ValueError(f"{flag}: the tokenizer in {path!r} does not load ({why})") from None
    if tok.pad_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise ValueError(f"{flag}: the tokenizer in {path!r} lacks [PAD], [CLS] or [SEP]")
    return tok


def lowercases(tokenizer):
    """Whether ``tokenizer`` lowercases its input (BERT's uncased models)."""
    return bool(getattr(tokenizer, "do_lower_case", True))


def check_model_type(path, flag, want):
    """The ``model_type`` of a checkpoint folder's ``config.json``; ``ValueError`` naming ``flag``
    when the file is missing, not JSON, or names another model type than ``want``."""
    cfg = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg):
        raise ValueError(f"{flag}: {path!r} holds no {CONFIG_FILE}: not a checkpoint folder")
    try:
        with open(cfg, encoding="utf-8") as f:
            found = json.load(f).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{flag}: {cfg!r} is not a JSON config ({_brief(exc, 200)})") from None
    if found != want:
        hint = (
            "an effbert (tupe-bert) checkpoint goes with --init"
            if flag == "--hf"
            else "a Hugging Face BERT goes with --hf"
        )
        raise ValueError(
            f"{flag}: {cfg!r} is a checkpoint of model type {found!r}, not {want!r} ({hint})"
        )
    return found


def multi_exit_config(config, num_labels, shared_pooler, backend):
    """``config`` (a ``TupeBertConfig``) with an off-ramp after every layer, ``num_labels`` outputs
    and no TNF notes (they help pretraining only)."""
    from .config import TupeBertConfig

    values = config.to_dict()
    values.update(
        multi_exit=True,
        num_labels=num_labels,
        shared_exit_pooler=bool(shared_pooler),
        backend=backend,
        tnf_num_notes=None,
    )
    for key in ("id2label", "label2id", "architectures", "transformers_version", "model_type"):
        values.pop(key, None)
    return TupeBertConfig.from_dict(values)


def classifier_from(
    encoder_model, config, num_labels, pooler=None, classifier=None, shared_pooler=False
):
    """A multi-exit ``TupeBertForSequenceClassification`` with ``encoder_model``'s embeddings and
    layers; every off-ramp's pooler starts from ``pooler`` (a state dict) when given, else from the
    last off-ramp's fresh one; the last off-ramp's classifier from ``classifier`` when its shape
    fits."""
    from .tupe_bert import TupeBertForSequenceClassification

    model = TupeBertForSequenceClassification(
        multi_exit_config(config, num_labels, shared_pooler, config.backend)
    )
    state = {k: v for k, v in encoder_model.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the encoder weights do not fit: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}"
        )
    last = model.exits[-1]
    model.init_exit_poolers(pooler if pooler is not None else last.pooler.state_dict())
    if classifier is not None and classifier["weight"].shape[0] == num_labels:
        last.classifier.load_state_dict(classifier)
    return model


def hf_folder_tokenizer(path, cased=None):
    """The checks every ``--hf`` start makes (a folder, transformers installed, a BERT
    ``config.json``) and the folder's tokenizer (``cased`` None keeps its casing). Raises
    ``FileNotFoundError`` or ``ValueError`` naming ``--hf``."""
    from ..integrations.hf import require_transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--hf: {path!r} is not a folder (a local Hugging Face BERT checkpoint)"
        )
    try:
        require_transformers()
    except ImportError as exc:  # the message says how to install it
        raise ValueError(f"--hf: {exc}") from None
    check_model_type(path, "--hf", want="bert")
    return load_tokenizer(path, "--hf", cased)


def from_hf_folder(path, num_labels, backend, cased=None, shared_pooler=False):
    """A local Hugging Face BERT folder: ``(multi-exit classifier, tokenizer, cased)``. ``cased``
    None keeps the tokenizer's casing."""
    from ..integrations.hf import from_hf_bert
    from .tupe_bert import TupeBertForSequenceClassification, TupeBertModel

    tokenizer = hf_folder_tokenizer(path, cased)
    try:
        hf = from_hf_bert(path, backend=backend)
    except (ValueError, OSError, ImportError, KeyError) as exc:
        raise ValueError(f"--hf: {_brief(exc, 400)}") from None
    pooler = classifier = None
    if isinstance(hf, TupeBertForSequenceClassification):
        encoder, classifier = hf.bert, hf.classifier.state_dict()
    else:  # a bare encoder, or a masked-LM checkpoint's encoder
        encoder = hf if isinstance(hf, TupeBertModel) else hf.bert
    if encoder.pooler is not None:
        pooler = encoder.pooler.dense.state_dict()
    model = classifier_from(encoder, encoder.config, num_labels, pooler, classifier, shared_pooler)
    return model, tokenizer, not lowercases(tokenizer)


def from_pretrain_folder(path, num_labels, backend, cased=None, shared_pooler=False):
    """An ``effbert pretrain`` output: ``(multi-exit classifier in train mode, tokenizer, cased)``.
    The weights are the run's own, or (a run stopped early) those of its newest complete
    ``checkpoint-N``; the tokenizer is the run's, else the checkpoint's. ``cased`` must match the
    run's tokenizer when given."""
    from .tupe_bert import TupeBertForSequenceClassification

    model, tokenizer = multi_exit_from_pretrain_folder(
        TupeBertForSequenceClassification, path, num_labels, backend, cased, shared_pooler
    )
    # no pooler in pretraining: one fresh one for all
    model.init_exit_poolers(model.exits[-1].pooler.state_dict())
    return model.train(), tokenizer, not lowercases(tokenizer)


def multi_exit_from_pretrain_folder(
    model_class, path, num_labels, backend, cased=None, shared_pooler=False
):
    """``(model_class.from_pretrained(...), tokenizer)`` from an ``effbert pretrain`` output (its
    weights, or its newest complete ``checkpoint-N``'s; its tokenizer, else the checkpoint's), as a
    multi-exit model of ``num_labels`` outputs (``multi_exit_config``). The masked-LM head, TNF's
    notes and what else ``model_class._keys_to_ignore_on_load_unexpected`` names are left out; any other missing, unexpected or
    mismatched weight but the new off-ramps' raises. ``model_class``: a multi-exit effbert class
    (``TupeBertForSequenceClassification``, ``TupeBertForTokenClassification``). Errors are one
    line naming ``--init`` (``FileNotFoundError`` for a missing folder, else ``ValueError``)."""
    from transformers.utils import logging as hf_logging

    from .config import TupeBertConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--init: {path!r} is not a folder (an effbert pretrain output)")
    weights = path
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES):
        weights = newest_checkpoint(path)
    if weights is None:
        raise ValueError(
            f"--init: {path!r} holds no weights ({' or '.join(WEIGHT_FILES)}, or a "
            "checkpoint-N "
            "folder): not the folder of an effbert pretrain run"
        )
    check_model_type(weights, "--init", want=TupeBertConfig.model_type)
    own = any(os.path.isfile(os.path.join(path, n)) for n in (TOKENIZER_FILE, VOCAB_FILE))
    tokenizer = load_tokenizer(path if own else weights, "--init")
    if cased is not None and cased == lowercases(tokenizer):
        raise ValueError(
            f"--cased {'given' if cased else 'not given'}, but the pretraining run "
            f"{'lowercased' if lowercases(tokenizer) else 'kept case'}"
        )
    verbosity = hf_logging.get_verbosity()
    # the off-ramps are new by design: checked below, not reported as missing
    hf_logging.set_verbosity_error()
    try:
        config = multi_exit_config(
            TupeBertConfig.from_pretrained(weights), num_labels, shared_pooler, backend
        )
        model, info = model_class.from_pretrained(weights, config=config, output_loading_info=True)
    # a cut or foreign weights file, a config that fails its checks: one line
    except Exception as exc:
        raise ValueError(f"--init: {_brief(exc, 400)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # what the class says a pretraining checkpoint may hold that it does not use (MLM head, notes)
    left_out = [re.compile(p) for p in model_class._keys_to_ignore_on_load_unexpected or ()]
    missing = [k for k in info["missing_keys"] if not k.startswith("exits.")]
    unexpected = [k for k in info["unexpected_keys"] if not any(p.match(k) for p in left_out)]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched or info.get("error_msgs"):
        raise ValueError(
            f"--init: the weights in {weights!r} do not fit the model: missing "
            f"{missing[:5]}, "
            f"unexpected {unexpected[:5]}, mismatched {mismatched[:5]}"
        )
    return model, tokenizer


def save_finetuned(out, model, tokenizer, labels, settings):
    """Write a fine-tuned multi-exit classifier to the folder ``out``: ``save_pretrained`` of
    ``model`` (``labels``, a list of str indexed by class id, as ``id2label``; ``config.backend``
    saved as ``auto``) and of ``tokenizer``, then ``finetune.json`` (``settings``, a
    JSON-serialisable dict) last, so a folder with it is complete. Every file is written mode 0644.
    Raises ``ValueError`` when ``labels`` does not match the model's outputs."""
    config = model.config
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    if len(labels) != config.num_labels:
        raise ValueError(
            f"labels must name the model's {config.num_labels} outputs, got {len(labels)}"
        )
    os.makedirs(out, exist_ok=True)
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
    written = {os.path.basename(os.fspath(p)) for p in tokenizer.save_pretrained(out)}
    for name in written | set(WEIGHT_FILES) | {CONFIG_FILE, "generation_config.json"}:
        # the weights come from a temporary file of mode 0600
        if os.path.isfile(os.path.join(out, name)):
            os.chmod(os.path.join(out, name), FILE_MODE)
    # finetune.json whole or not at all (a temporary file renamed), as the run folder writes its
    # files
    tmp = os.path.join(out, SETTINGS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, os.path.join(out, SETTINGS_FILE))


def load_finetuned(path, device=None, backend="auto"):
    """A model ``effbert finetune`` wrote to ``path``: ``(TupeBertForSequenceClassification with
    off-ramps, in eval mode; BertTokenizerFast; labels, a list of str indexed by class id; settings
    dict, with max_len)``; a ``--task token-classification`` run (``settings["task"]``) gives a
    multi-exit ``TupeBertForTokenClassification`` instead (its calibrated TOKEE threshold, if any,
    in ``settings["token_exit"]`` and ``config.token_exit``). The folder is also a ``transformers``
    checkpoint: ``AutoModelForSequenceClassification.from_pretrained(path)``
    (``AutoModelForTokenClassification`` for tokens) gives the same model. Raises
    ``FileNotFoundError`` for a folder that is not such a run and ``ValueError`` for weights or a
    tokenizer that cannot be read (weights are read as safetensors, or with ``torch.load(...,
    weights_only=True)``: never unpickled code)."""
    from transformers import BertTokenizerFast

    from .tupe_bert import TupeBertForSequenceClassification

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path must be the folder of an effbert finetune run, got {path!r}")
    path = os.fspath(path)
    for name in (CONFIG_FILE, SETTINGS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(
                f"path: {path!r} holds no {name}: not the folder of an effbert finetune run"
            )
    if not any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES):
        raise FileNotFoundError(
            f"path: {path!r} holds no {WEIGHT_FILES[0]}: not the folder of an effbert finetune run"
        )
    with open(os.path.join(path, SETTINGS_FILE), encoding="utf-8") as f:
        settings = json.load(f)
    cls = TupeBertForSequenceClassification
    if isinstance(settings, dict) and settings.get("task") == "token-classification":
        from .token_classification import TupeBertForTokenClassification as cls
    try:
        model = cls.from_pretrained(path, backend=backend)
    except Exception as exc:  # a cut, tampered or foreign file
        raise ValueError(f"path: cannot read the model in {path!r} ({_brief(exc)})") from None
    if not model.config.multi_exit:
        raise ValueError(
            f"path: {path!r} holds a model without off-ramps (config.multi_exit is false)"
        )
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    try:
        tokenizer = BertTokenizerFast.from_pretrained(path)
    except Exception as exc:
        raise ValueError(f"path: the tokenizer in {path!r} does not load ({_brief(exc)})") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, labels, settings


# ------------------------------------------------------------------ Trainer's checkpoint folders


def checkpoints(root):
    """The ``checkpoint-N`` folders in ``root``, oldest first (complete or not)."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [
        n
        for n in names
        if re.fullmatch(r"checkpoint-\d+", n) and os.path.isdir(os.path.join(root, n))
    ]
    return [os.path.join(root, n) for n in sorted(found, key=lambda n: int(n.split("-")[1]))]


def missing_files(ckpt, need=CHECKPOINT_FILES):
    """What a checkpoint lacks to be a whole save: the names (patterns) of ``need`` absent or empty, and
    ``trainer_state.json`` when it does not read as Trainer's state. Empty: complete."""
    try:
        names = [n for n in os.listdir(ckpt) if os.path.getsize(os.path.join(ckpt, n)) > 0]
    except OSError:
        return list(need)
    if "pytorch_model.bin" in names:  # a checkpoint saved without safetensors
        names.append("model.safetensors")
    missing = [p for p in need if not fnmatch.filter(names, p)]
    if "trainer_state.json" in need and "trainer_state.json" not in missing:
        try:
            with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
                if not isinstance(json.load(f).get("global_step"), int):
                    raise ValueError
        except (OSError, ValueError, AttributeError):
            missing.append("a readable trainer_state.json")
    return missing


def newest_complete(root, log=None, need=CHECKPOINT_FILES):
    """The newest complete checkpoint in ``root`` (None: none); ``log`` hears one line naming the incomplete ones
    skipped, which stay where they are. ``need``: the files that make it complete (``MODEL_FILES``: to load the
    model only)."""
    skipped = []
    for ckpt in reversed(checkpoints(root)):
        missing = missing_files(ckpt, need)
        if not missing:
            break
        skipped.append(f"{os.path.basename(ckpt)} (no {', '.join(missing)})")
    else:
        ckpt = None
    if skipped and log is not None:
        log(f"skipping incomplete {'; '.join(skipped)}: a save that did not finish, left in place")
    return ckpt


# -------------------------------------------------------------------- an effbert pretrain run


RUN_FILE, RARE_FILE = "pretrain.json", "rare_words.txt"
CHECKPOINT_DIR = "checkpoints"  # DIR/checkpoints/checkpoint-N (earlier versions: DIR/checkpoint-N)


def read_lines(path):
    """The lines of the UTF-8 text file ``path``, without their line ends."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def check_model_folder(path, what):
    """``path`` holds a tupe-bert ``config.json``: its values, else a ``ValueError`` that starts
    with ``what`` and names the file and what it holds."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ValueError(f"{what}: {path!r} holds no config.json (not a save_pretrained folder)")
    try:
        with open(cfg, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what}: cannot read {cfg!r} ({_brief(exc)})") from None
    kind = values.get("model_type") if isinstance(values, dict) else None
    if kind != "tupe-bert":
        raise ValueError(
            f"{what}: {cfg!r} is a model of type {kind!r}, not 'tupe-bert' (effbert's TUPE BERT)"
        )
    return values


def newest_checkpoint(path):
    """The newest checkpoint of the pretraining run in ``path`` whose model loads (config and
    weights whole): ``DIR/checkpoints/checkpoint-N``, or ``DIR/checkpoint-N`` for a run of an
    earlier version; None when there is none."""
    return newest_complete(os.path.join(path, CHECKPOINT_DIR), need=MODEL_FILES) or newest_complete(
        path, need=MODEL_FILES
    )


def load_pretrained(path, device=None, backend="auto"):
    """The model an ``effbert pretrain`` run wrote to ``path``: ``(TupeBertForMaskedLM,
    BertTokenizerFast, RareWordTable or None)``, in eval mode, on ``device`` (None: the CPU) with
    the op ``backend``. Reads the final model (``model.safetensors``), or the newest complete
    checkpoint (``DIR/checkpoints/checkpoint-N``) when the run has not finished (an MC-BERT
    checkpoint's controller is left out). The classification model of ``effbert finetune`` takes
    the encoder from ``model.bert``. Raises ``FileNotFoundError`` for a folder that is not a
    pretraining run and ``ValueError`` for a model of another type or damaged files."""
    from ..data.corpus import rare_word_table
    from ..data.tokenization import load_tokenizer
    from .tupe_bert import TupeBertForMaskedLM

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise FileNotFoundError(f"path must be the folder of an effbert pretrain run, got {path!r}")
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, RUN_FILE)):
        raise FileNotFoundError(
            f"path: {path!r} holds no {RUN_FILE}: not the folder of an effbert pretrain run"
        )
    with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    where = path
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        where = newest_checkpoint(path)
        if where is None:
            raise FileNotFoundError(
                f"path: {path!r} holds neither model.safetensors nor a complete checkpoint"
            )
    check_model_folder(where, "path")
    tokenizer = load_tokenizer(path, lowercase=not run["settings"]["cased"])
    try:
        model = TupeBertForMaskedLM.from_pretrained(where, backend=backend)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"path: cannot load the model in {where!r} ({_brief(exc)})") from None
    table = None
    rare = os.path.join(path, RARE_FILE)
    words = read_lines(rare) if os.path.isfile(rare) else []
    if words and model.notes is not None:  # a corpus without rare-band words: trained without notes
        table = rare_word_table(words, tokenizer)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, table
