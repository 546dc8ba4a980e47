"""Labelled examples for fine-tuning: the ``label<TAB>text`` file ``effbert finetune`` reads, the
checks that catch a file given the wrong way round, and its rows as token ids.

Errors are ``ValueError`` whose message names the flag the file came from (``--train``, ``--eval``)
and the line; a file that is not text gets the message of the pretraining corpus check
(``corpus.check_text_file``).
"""

import math
import os
from collections import Counter

import torch

__all__ = ["read_tsv", "check_labels", "label_numbers", "encode", "batch_rows", "to_dataset"]

# a first line whose label is one of these, seen nowhere else in the file, is a header row
_HEADER_LABELS = {
    "label",
    "labels",
    "class",
    "category",
    "target",
    "y",
    "sentiment",
    "topic",
    "intent",
}
_HEADER_TEXTS = ("text", "sentence", "texts", "review")


def read_tsv(path, flag="--train"):
    """``(labels, texts)``, two lists of str, of a UTF-8 ``label<TAB>text`` file; blank lines are
    skipped and a line is cut at ``\\n`` only (a text may hold U+2028 and the like). Raises
    ``ValueError`` naming ``flag`` (and the line) for a missing, binary or non-UTF-8 file, a line
    without a TAB or with an empty label, or no examples."""
    from .corpus import check_text_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {os.fspath(path)!r}")
    try:
        check_text_file(path)
    except ValueError as exc:  # binary, not UTF-8, empty: the corpus check's words
        raise ValueError(f"{flag}: {exc}") from None
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    labels, texts = [], []
    for n, line in enumerate(raw.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise ValueError(f"{flag}: line {n} of {path!r} has no TAB (expected label<TAB>text)")
        label = label.strip()
        if not label:
            raise ValueError(f"{flag}: line {n} of {path!r} has an empty label")
        labels.append(label)
        texts.append(text)
    if not texts:
        raise ValueError(f"{flag}: {path!r} holds no examples")
    return labels, texts


def label_numbers(names, flag="--train"):
    """Regression targets: every label a finite number, as float32 ``[B]``. Raises ``ValueError``
    naming ``flag`` and the example otherwise."""
    out = []
    for n, name in enumerate(names, 1):
        try:
            v = float(name)
        except ValueError:
            v = float("nan")
        if not math.isfinite(v):
            raise ValueError(
                f"{flag}: example {n} has the label {name!r}, not a finite number (--regression)"
            )
        out.append(v)
    return torch.tensor(out, dtype=torch.float32)


def check_labels(labels, texts, path, flag="--train", warn=None):
    """Refuse a label column that holds text (the columns swapped: nearly one label per example) and
    a header row taken for an example (``ValueError`` naming ``flag``); ``warn(msg)`` hears about
    few examples a class and about a label seen on one line only when others repeat."""
    if len(labels) != len(texts) or not labels:
        raise ValueError(
            f"labels and texts must be two non-empty lists of one length, got "
            f"{len(labels)} and "
            f"{len(texts)}"
        )
    counts = Counter(labels)
    n = len(labels)
    if n >= 8 and len(counts) > n // 2:
        many = f"{len(counts)} different labels in {n} examples of {path!r}"
        wordy = sum(1 for lab in counts if len(lab.split()) > 2)
        if 2 * wordy >= len(counts):
            raise ValueError(
                f"{flag}: {many}, {wordy} of them several words long: is the file "
                "text<TAB>label? "
                "expected label<TAB>text"
            )
        if warn is not None:
            warn(f"{flag}: {many}: few examples a class (is the first column the label?)")
    first = labels[0]
    if (
        counts[first] == 1
        and n > 1
        and (first.lower() in _HEADER_LABELS or texts[0].strip().lower() in _HEADER_TEXTS)
    ):
        raise ValueError(
            f"{flag}: line 1 of {path!r} ({first!r}<TAB>{texts[0][:20]!r}) looks like "
            "a header row; "
            "remove it (the file is label<TAB>text with no header)"
        )
    once = sorted(lab for lab, c in counts.items() if c == 1)
    if warn is not None and once and len(once) < len(counts) and n >= 4 * len(counts):
        warn(
            f"{flag}: label(s) {once[:5]} occur on one line only in {path!r}: a typo or a stray "
            "row?"
        )


def encode(tokenizer, texts, max_length):
    """``(input_ids [B, n] int64 right-padded with the pad id, lengths [B] int64)``: each text as
    the tokenizer gives it ([CLS] ... [SEP]), cut to ``max_length`` pieces."""
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 ([CLS], a piece, [SEP]), got {max_length}")
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_attention_mask=False,
    )["input_ids"]
    lengths = torch.tensor([len(x) for x in enc], dtype=torch.int64)
    ids = torch.full(
        (len(enc), int(lengths.max()) if enc else 0), tokenizer.pad_token_id or 0, dtype=torch.int64
    )
    for i, x in enumerate(enc):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.int64)
    return ids, lengths


def batch_rows(input_ids, lengths, rows, device):
    """Rows ``rows`` of ``encode``'s output cut to their longest: ``(input_ids [b, n],
    attention_mask [b, n] bool)`` on ``device``."""
    b_len = lengths[rows]
    n = int(b_len.max())
    attention_mask = torch.arange(n)[None] < b_len[:, None]
    return input_ids[rows, :n].to(device), attention_mask.to(device)


def to_dataset(tokenizer, texts, targets, max_length):
    """The examples as a ``datasets.Dataset`` (``input_ids``, ``attention_mask``, ``labels``),
    tokenized in batches by the fast tokenizer; ``transformers.DataCollatorWithPadding`` pads each
    batch to its longest row. ``targets``: ``[B]`` tensor (int64 class ids, or float32 for
    regression)."""
    import datasets

    if len(texts) != len(targets):
        raise ValueError(
            f"texts and targets must have one length, got {len(texts)} and {len(targets)}"
        )
    ds = datasets.Dataset.from_dict({"text": list(texts), "labels": targets.tolist()})
    return ds.map(
        lambda b: tokenizer(
            b["text"], truncation=True, max_length=max_length, return_token_type_ids=False
        ),
        batched=True,
        remove_columns=["text"],
    )
