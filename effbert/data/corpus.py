"""The pretraining corpus through ``datasets``: text files read, checked, tokenized in batches by several processes
and cached memory-mapped (Arrow) on disk, so memory does not grow with the corpus.

    tok = load_tokenizer("vocab.txt")
    ds = load_corpus(["wiki.txt"], tok, max_length=128, num_proc=4)         # a datasets.Dataset of texts
    counts = count_words(ds, tok)                                           # for TNF's rare words

The files are BERT's pretraining format (google-research/bert ``create_pretraining_data.py``): one sentence (or
paragraph) a line, a blank line between documents. Two formats of examples:

- ``"documents"`` (default): RoBERTa's DOC-SENTENCES (Liu et al. 2019; fairseq ``TokenBlockDataset`` with
  ``break_mode="complete_doc"``): each document's lines are concatenated into texts ``[CLS] ... [SEP]`` of at most
  ``max_length`` pieces, whole lines at a time; a text never spans two documents; a line longer than a text is cut
  at a word start. Columns: ``input_ids``.
- ``"lines"``: a text ``[CLS] line [SEP]`` per non-blank line (a line longer than ``max_length`` is cut at word
  starts into several): sentence-level data, and the real length distribution of a one-sentence-a-line corpus.

Masking is left to the collator (dynamic, as RoBERTa), so there is no ``dupe_factor``. (BERT's
NSP and ALBERT's SOP sentence pairs are not offered: no effbert model has their head.)

Deviations, for bounded memory: the corpus is read in batches of ``batch_size`` lines, and a batch boundary ends a
document (one extra text boundary per batch, and per process with ``num_proc``). So the texts
depend on ``batch_size`` and ``num_proc`` (and on nothing else).
"""

import codecs
import collections
import numbers
import os

import numpy as np

from .tokenization import check_tokenizer, path_problem

__all__ = [
    "MAX_LINE_BYTES",
    "FORMATS",
    "check_text_file",
    "load_corpus",
    "count_words",
    "rare_words",
    "rare_word_table",
]

# A line is a sentence or a paragraph; 1 MiB is already ~150,000 words. Longer lines mean a file that is not text
# in this format (a dump without newlines, minified data), and one such line would be held whole in memory.
MAX_LINE_BYTES = 1 << 20
FORMATS = ("documents", "lines")
_CHUNK = 1 << 24


def check_text_file(path, max_line_bytes=None):
    """Read ``path`` once in 16 MiB chunks and raise ``ValueError`` (one line naming the file) if it is missing, a
    directory or not a regular file (a fifo, socket or device), not UTF-8, binary (holds a NUL byte), has a line
    over ``max_line_bytes`` bytes (None = ``MAX_LINE_BYTES``), or holds no text (empty or only whitespace). Memory
    stays at one chunk whatever the file's size."""
    path = os.fspath(path)
    max_line_bytes = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(
            f"{path!r}: {problem}" if problem == "no such file" else f"{path!r} {problem}"
        )
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, line, has_text = 0, 0, False  # line: bytes since the last newline
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise ValueError(
                    f"{path!r} is binary, not text (a NUL byte at byte {offset + nul})"
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path!r} is not UTF-8 text ({exc.reason} at byte {offset + exc.start})"
                ) from None
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            if nl.size == 0:
                longest, line = line + len(chunk), line + len(chunk)
            else:
                longest = max(line + int(nl[0]), int(np.diff(nl).max()) - 1 if nl.size > 1 else 0)
                line = len(chunk) - int(nl[-1]) - 1
            if max(longest, line) > max_line_bytes:
                raise ValueError(
                    f"{path!r} has a line over {max_line_bytes} bytes (near byte {offset}): not one "
                    "sentence or paragraph a line"
                )
            has_text = has_text or not chunk.isspace()
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path!r} is not UTF-8 text ({exc.reason} at the end of the file)"
        ) from None
    if not has_text:
        raise ValueError(f"{path!r} holds no text (empty, or every line is blank)")


def _check_paths(paths):
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not hasattr(paths, "__iter__"):
        raise TypeError(f"paths must be a path or a list of paths, got {type(paths).__name__}")
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("paths must name at least one text file")
    return paths


def _check_int(name, value, low, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(
            f"{name} must be {'None or ' if allow_none else ''}an int >= {low}, got {value!r}"
        )


def _continuation(tokenizer):
    """Bool numpy ``[V]``: True for ``##`` continuation pieces."""
    vocab = tokenizer.get_vocab()
    cont = np.zeros(max(vocab.values()) + 1, dtype=bool)
    for piece, i in vocab.items():
        cont[i] = piece.startswith("##") and len(piece) > 2
    return cont


def _cut(ids, budget, cont):
    """Split a piece list longer than ``budget`` into parts of at most ``budget``, each cut just before a word start
    when one lies in the part (else mid-word)."""
    parts = []
    while len(ids) > budget:
        cut = budget
        while cut > 0 and cont[ids[cut]]:
            cut -= 1
        cut = cut or budget
        parts.append(ids[:cut])
        ids = ids[cut:]
    return parts, ids


def _documents_of(lines, encoded):
    """Group a batch's tokenized lines into documents (lists of non-empty piece lists); blank lines separate them."""
    docs, cur = [], []
    for line, ids in zip(lines, encoded):
        if not line.strip():
            if cur:
                docs.append(cur)
            cur = []
        elif ids:
            cur.append(ids)
    if cur:
        docs.append(cur)
    return docs


class _Encoder:
    """The tokenizer's ``tokenizers.Tokenizer`` without truncation or padding (a fast tokenizer keeps whatever a
    previous call with ``truncation=True`` set), called directly: the batch call of ``transformers`` adds about a
    third to the time for dictionaries this never reads."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()

    def __call__(self, lines):
        return [e.ids for e in self.backend.encode_batch(lines, add_special_tokens=False)]


class _Texts:
    """The batched ``datasets.map`` function of ``format="documents"`` and ``"lines"`` (a class so ``datasets`` can
    fingerprint it for the cache)."""

    def __init__(self, tokenizer, max_length, per_line=False):
        self.encode = _Encoder(tokenizer)
        self.max_length = max_length
        self.per_line = per_line
        self.cont = _continuation(tokenizer)
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def __call__(self, batch):
        lines = batch["text"]
        encoded = self.encode(lines)
        budget = self.max_length - 2
        out = []
        if self.per_line:  # format="lines": a text per line, a longer line cut before word starts
            for ids in encoded:
                if ids:
                    parts, ids = _cut(ids, budget, self.cont)
                    out.extend([self.cls] + p + [self.sep] for p in parts + [ids])
            return {"input_ids": out}
        for doc in _documents_of(lines, encoded):
            cur = []
            for ids in doc:
                if len(cur) + len(ids) <= budget:
                    cur.extend(ids)
                    continue
                if cur:
                    out.append([self.cls] + cur + [self.sep])
                parts, ids = _cut(ids, budget, self.cont)
                out.extend([self.cls] + p + [self.sep] for p in parts)
                cur = list(ids)
            if cur:
                out.append([self.cls] + cur + [self.sep])
        return {"input_ids": out}


def load_corpus(
    paths,
    tokenizer,
    max_length,
    *,
    format="documents",
    num_proc=None,
    cache_dir=None,
    batch_size=1000,
):
    """Text files -> a ``datasets.Dataset`` of tokenized texts (see the module docstring for the formats).

    ``paths``: a path or a list of paths to UTF-8 text (one sentence or paragraph a line, blank lines between
    documents); ``tokenizer``: a ``BertTokenizerFast`` (``load_tokenizer`` / ``train_wordpiece``); ``max_length``:
    the most pieces of a text, [CLS] and [SEP] included (>= 3); ``format``: ``"documents"`` or
    ``"lines"``;
    ``num_proc``: processes for tokenization (None = this process); ``cache_dir``: where ``datasets`` keeps the
    Arrow files (None = its default, ``~/.cache/huggingface/datasets``); a second call with the same files,
    tokenizer and arguments reuses them; ``batch_size``: lines tokenized at once.

    Returns a memory-mapped ``datasets.Dataset`` with ``input_ids`` (int32 lists).
    Raises ``ValueError`` (one line naming the file) for a file that is missing, a directory or not a regular file,
    empty, not UTF-8, binary or has a line over ``MAX_LINE_BYTES`` (1 MiB): every file is checked before anything
    is written to the cache; and ``ValueError`` for bad arguments or a corpus that yields no text.
    """
    import datasets

    paths = _check_paths(paths)
    check_tokenizer(tokenizer)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    _check_int("max_length", max_length, 3)
    _check_int("num_proc", num_proc, 1, allow_none=True)
    _check_int("batch_size", batch_size, 1)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be None or a path, got {type(cache_dir).__name__}")
    for p in paths:
        check_text_file(p)
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    raw = datasets.load_dataset(
        "text", data_files={"train": paths}, split="train", cache_dir=cache_dir
    )
    fn = _Texts(tokenizer, max_length, per_line=format == "lines")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    ds = raw.map(
        fn,
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        features=features,
        num_proc=num_proc,
        desc=f"tokenizing ({format})",
    )
    if len(ds) == 0:
        raise ValueError(
            f"{paths[0]!r}{' and the other files' if len(paths) > 1 else ''}: no text left after "
            "tokenization"
        )
    return ds


def _list_column(table, name):
    """The flat values (numpy) and the per-row lengths (numpy) of an Arrow list column."""
    import pyarrow.compute as pc

    col = table.column(name)
    return (
        pc.list_flatten(col).to_numpy(zero_copy_only=False),
        pc.list_value_length(col).to_numpy(zero_copy_only=False),
    )


def count_words(source, tokenizer, *, batch_size=10000, num_proc=None, cache_dir=None):
    """How often each word occurs, streamed over a tokenized dataset in batches of ``batch_size`` rows (the corpus is
    never in memory whole). A word is a word-start piece and the ``##`` pieces after it, spelled back as text
    (``"runn" "##ing"`` -> ``"running"``): the tokenizer's normalized, pre-tokenized word. Special tokens and
    ``[UNK]`` are not counted.

    ``source``: a ``datasets.Dataset`` with ``input_ids`` (``load_corpus``'s, packed or not), or text file paths
    (tokenized first with ``load_corpus(..., max_length=512, num_proc=num_proc, cache_dir=cache_dir)``).
    Returns a ``collections.Counter`` word -> count, for ``build_rare_vocab`` / ``rare_words``.
    """
    import datasets

    check_tokenizer(tokenizer)
    _check_int("batch_size", batch_size, 1)
    if not isinstance(source, datasets.Dataset):
        source = load_corpus(source, tokenizer, 512, num_proc=num_proc, cache_dir=cache_dir)
    if "input_ids" not in source.column_names:
        raise ValueError(f"source must have an input_ids column, got columns {source.column_names}")
    vocab = tokenizer.get_vocab()
    V = max(vocab.values()) + 1
    surface = np.empty(V, dtype=object)
    surface[:] = ""
    cont = np.zeros(V, dtype=bool)
    for piece, i in vocab.items():
        cont[i] = piece.startswith("##") and len(piece) > 2
        surface[i] = piece[2:] if cont[i] else piece
    special = np.zeros(V, dtype=bool)
    special[[i for i in tokenizer.all_special_ids if 0 <= i < V]] = True
    counts = collections.Counter()
    for table in source.with_format("arrow").iter(batch_size=batch_size):
        ids, lengths = _list_column(table, "input_ids")
        if ids.size == 0:
            continue
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"input_ids must be in [0, {V}) (the tokenizer's vocabulary)")
        row_start = np.zeros(ids.size, dtype=bool)
        offsets = np.cumsum(lengths) - lengths
        row_start[offsets[offsets < ids.size]] = True
        starts = np.flatnonzero(~cont[ids] | row_start | special[ids])
        words = np.add.reduceat(surface[ids], starts)
        keep = ~special[ids[starts]]
        counts.update(words[keep].tolist())
    return counts


def rare_words(counts, tokenizer, min_count=100, max_count=500, max_size=None):
    """TNF's rare words (Wu et al. 2021, "Taking Notes on the Fly"): the words whose count lies in
    ``[min_count, max_count]``, most frequent first (``build_rare_vocab``), without words that hold no letter or digit
    (punctuation) and words the vocabulary covers only with ``[UNK]``. ``counts``: ``count_words``'s Counter."""
    from .tnf import build_rare_vocab

    check_tokenizer(tokenizer)
    words = build_rare_vocab(counts, min_count, max_count, max_size)
    unk = tokenizer.unk_token_id
    return [
        w
        for w in words
        if any(c.isalnum() for c in w) and unk not in tokenizer.encode(w, add_special_tokens=False)
    ]


def rare_word_table(words, tokenizer):
    """A ``RareWordTable`` of ``words`` for ``tokenizer`` (each word's pieces, and the ``##`` continuation table).
    Words that do not tokenize to one word-start piece and continuation pieces are left out."""
    import torch

    from .tnf import RareWordTable

    check_tokenizer(tokenizer)
    cont = torch.from_numpy(_continuation(tokenizer))
    kept = []
    for w in words:
        ids = tokenizer.encode(w, add_special_tokens=False)
        if ids and not cont[ids[0]] and all(bool(cont[i]) for i in ids[1:]):
            kept.append(w)
    return RareWordTable.build(kept, lambda w: tokenizer.encode(w, add_special_tokens=False), cont)
