"""Sequence-labelling data in the CoNLL layout for token classification (Li et al., ACL 2021's NER
and POS tasks; the CoNLL-2003 shared task's file format): one token a line, its label in the last
whitespace-separated column (CoNLL-2003's four columns ``word POS chunk NER`` read as word and NER
tag), a blank line between sentences, ``-DOCSTART-`` lines skipped. Labels go on the first word
piece of each word and -100 on every other token, as transformers' token classification examples do,
through a fast tokenizer's ``word_ids()``.

Errors are ``ValueError`` naming the flag the file came from (``--train``, ``--eval``), the file and
the line.
"""

import os

__all__ = ["read_conll", "check_bio", "label_list", "encode_conll", "token_classification_collator"]

DOCSTART = "-DOCSTART-"


def read_conll(path, flag="--train", *, scheme="bio"):
    """``(words, tags)``: two lists of sentences, each a list of str, of a UTF-8 CoNLL-style file.

    Each non-blank line is ``token ... label`` (at least two whitespace-separated columns: the first
    is the token, the last its label); a blank line ends a sentence; a line whose first column is
    ``-DOCSTART-`` is skipped (and ends the sentence before it). ``scheme="bio"`` checks the labels
    with ``check_bio``; ``None`` takes any labels (part-of-speech tags, say).

    Raises ``ValueError`` naming ``flag``, the file and the line for a missing or non-UTF-8 file, a
    line of one column, a label that breaks the scheme, or a file without sentences;
    ``ValueError`` for a bad ``scheme``.
    """
    if scheme not in ("bio", None):
        raise ValueError(f"scheme must be 'bio' or None, got {scheme!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {os.fspath(path)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{flag}: {os.fspath(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    words, tags, lines = [], [], []
    sent_words, sent_tags, sent_lines = [], [], []

    def close():
        if sent_words:
            words.append(list(sent_words))
            tags.append(list(sent_tags))
            lines.append(list(sent_lines))
        sent_words.clear()
        sent_tags.clear()
        sent_lines.clear()

    for n, line in enumerate(raw.split("\n"), 1):
        cols = line.split()
        if not cols:
            close()
            continue
        if cols[0] == DOCSTART:
            close()
            continue
        if len(cols) < 2:
            raise ValueError(
                f"{flag}: line {n} of {os.fspath(path)!r} has one column {line.strip()!r} "
                "(expected a token and its label, whitespace-separated)"
            )
        sent_words.append(cols[0])
        sent_tags.append(cols[-1])
        sent_lines.append(n)
    close()
    if not words:
        raise ValueError(f"{flag}: {os.fspath(path)!r} holds no sentences")
    if scheme == "bio":
        for sent, at in zip(tags, lines):
            check_bio(sent, path=path, flag=flag, lines=at)
    return words, tags


def check_bio(tags, *, path="<tags>", flag="--train", lines=None):
    """Checks one sentence's labels against the BIO (IOB2) scheme: each is ``O``, ``B-TYPE`` or
    ``I-TYPE``, and an ``I-TYPE`` follows a ``B-TYPE`` or ``I-TYPE`` of the same type (CoNLL-2003's
    original IOB1 files, where a chunk may start with ``I-``, fail here: convert them to IOB2
    first). ``lines``: each label's line number in ``path``, for the message. Raises ``ValueError``
    naming ``flag``, ``path`` and the line."""
    if lines is not None and len(lines) != len(tags):
        raise ValueError(
            f"lines must give one line number per tag, got {len(lines)} for {len(tags)}"
        )
    prev = "O"
    for i, tag in enumerate(tags):
        where = f"{flag}: line {lines[i] if lines is not None else i + 1} of {os.fspath(path)!r}"
        if tag != "O":
            head, dash, kind = tag.partition("-")
            if head not in ("B", "I") or not dash or not kind:
                raise ValueError(f"{where}: label {tag!r} is not BIO (O, B-TYPE or I-TYPE)")
            if head == "I" and prev[2:] != kind:
                raise ValueError(
                    f"{where}: {tag!r} follows {prev!r}: an I- label must continue a chunk of its "
                    "type (IOB1 data: convert it to IOB2)"
                )
        prev = tag


def label_list(tags):
    """The sorted label names of ``tags`` (a list of sentences' label lists), ``"O"`` first when
    present: the order that gives each label its class number (``id2label``). Raises ``ValueError``
    when there is none.
    """
    names = sorted({t for sent in tags for t in sent})
    if not names:
        raise ValueError("tags holds no labels")
    if "O" in names:
        names.remove("O")
        names.insert(0, "O")
    return names


def encode_conll(tokenizer, words, tags, label2id, max_length):
    """Tokenises pre-split sentences with a fast tokenizer (``is_split_into_words=True``,
    [CLS]/[SEP] added, truncated to ``max_length`` pieces) and puts each word's class number on its
    first word piece, -100 on every other piece and the special tokens (``word_ids()``). A word cut
    off by truncation has no label.

    Arguments: ``tokenizer`` a transformers fast tokenizer; ``words``/``tags`` lists of sentences
    (``read_conll``); ``label2id`` dict str -> int; ``max_length`` int >= 2. Returns a list of dicts
    ``{"input_ids", "attention_mask", "labels"}`` (lists of int), one per sentence. Raises
    ``ValueError`` naming the argument for a slow tokenizer, mismatched lengths, a label missing
    from ``label2id``, or a bad ``max_length``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer must be a fast tokenizer (its word_ids() map pieces to words)")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if len(words) != len(tags) or any(len(w) != len(t) for w, t in zip(words, tags)):
        raise ValueError("words and tags must hold the same sentences, one tag per word")
    missing = {t for sent in tags for t in sent} - set(label2id)
    if missing:
        raise ValueError(f"label2id has no class for {sorted(missing)}")
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    rows = []
    for i, sent in enumerate(tags):
        labels, prev = [], None
        for w in enc.word_ids(i):
            labels.append(-100 if w is None or w == prev else label2id[sent[w]])
            prev = w
        rows.append(
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": labels,
            }
        )
    return rows


def token_classification_collator(tokenizer, pad_to_multiple_of=None):
    """The batch collator of ``encode_conll``'s rows: transformers'
    ``DataCollatorForTokenClassification`` (right padding, ``labels`` padded with -100, torch
    tensors). Returns the collator."""
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(
        tokenizer,
        padding=True,
        label_pad_token_id=-100,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )
