"""Loading what ``effbert pretrain`` wrote: :func:`load_pretrained` gives back the masked-LM model,
its tokenizer and its rare-word table from a run folder (the final model, or the newest complete
checkpoint of a run still going)."""

import json
import os

__all__ = ["RUN_FILE", "RARE_FILE", "CHECKPOINT_DIR", "check_model_folder", "load_pretrained",
           "newest_checkpoint", "read_lines"]

RUN_FILE, RARE_FILE = "pretrain.json", "rare_words.txt"
CHECKPOINT_DIR = "checkpoints"  # DIR/checkpoints/checkpoint-N (earlier versions: DIR/checkpoint-N)


def _one_line(exc):
    return " ".join(str(exc).split())[:300]


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
        raise ValueError(f"{what}: cannot read {cfg!r} ({_one_line(exc)})") from None
    kind = values.get("model_type") if isinstance(values, dict) else None
    if kind != "tupe-bert":
        raise ValueError(f"{what}: {cfg!r} is a model of type {kind!r}, not 'tupe-bert' (effbert's "
                         "TUPE BERT)")
    return values


def newest_checkpoint(path):
    """The newest checkpoint of the pretraining run in ``path`` whose model loads (config and
    weights whole): ``DIR/checkpoints/checkpoint-N``, or ``DIR/checkpoint-N`` for a run of an
    earlier version; None when there is none."""
    from ..training.run_folder import MODEL_FILES, newest_complete

    return (newest_complete(os.path.join(path, CHECKPOINT_DIR), need=MODEL_FILES)
            or newest_complete(path, need=MODEL_FILES))


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
        raise FileNotFoundError(f"path: {path!r} holds no {RUN_FILE}: not the folder of an effbert "
                                "pretrain run")
    with open(os.path.join(path, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    where = path
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        where = newest_checkpoint(path)
        if where is None:
            raise FileNotFoundError(f"path: {path!r} holds neither model.safetensors nor a "
                                    "complete checkpoint")
    check_model_folder(where, "path")
    tokenizer = load_tokenizer(path, lowercase=not run["settings"]["cased"])
    try:
        model = TupeBertForMaskedLM.from_pretrained(where, backend=backend)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"path: cannot load the model in {where!r} ({_one_line(exc)})") from None
    table = None
    rare = os.path.join(path, RARE_FILE)
    words = read_lines(rare) if os.path.isfile(rare) else []
    if words and model.notes is not None:  # a corpus without rare-band words: trained without notes
        table = rare_word_table(words, tokenizer)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, table
