"""Packing: several texts in one row of up to ``max_length`` real tokens, ``position_ids`` restarting at 0 at each
text's first token, so the model keeps the texts apart (attention never crosses a restart) and each text's [CLS] is
position 0. This is the layout of transformers' ``DataCollatorWithFlattening`` (a restart of ``position_ids`` marks
a text boundary), done once on the dataset instead of per batch.

The algorithm is best-fit decreasing over a window (Johnson 1973; Krell et al. 2021, "Efficient Sequence Packing
without Cross-contamination", compare it with their shortest-pack-first histogram packing): the texts of a window
of ``window`` consecutive texts are taken longest first, and each goes into the open row whose free space is the
smallest that still holds it, or a new row. Texts never move between windows, so memory is one window, and the
order of texts is kept up to the window.

    packed = pack(ds, max_length=512)         # packed.dataset, packed.fill_rate (log it)
    rows, fill = pack_lengths(lengths, 512)   # the same algorithm on bare lengths (benchmarks)
"""

import bisect
import numbers
from typing import NamedTuple

import numpy as np

__all__ = ["pack_lengths", "pack", "Packed"]


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _best_fit_decreasing(lengths, max_length):
    """Rows (lists of indices into ``lengths``) of one window, best-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    rows = []
    free = []  # sorted (free space, row index) of the rows that still have room
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, r = max_length - n, len(rows) - 1
        else:
            room, r = free.pop(at)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


def pack_lengths(lengths, max_length, window=None):
    """Best-fit decreasing packing of texts of ``lengths`` tokens into rows of ``max_length``.

    ``lengths``: a sequence of ints in ``[1, max_length]`` (real tokens of each text); ``window``: texts packed
    together (None = all at once). Returns ``(rows, fill_rate)``: ``rows`` a list of lists of indices into
    ``lengths`` (each index once, each row's lengths summing to at most ``max_length``), ``fill_rate`` = real tokens /
    (rows * max_length), a float in (0, 1] (0.0 for no texts). Raises ``ValueError`` for a length outside
    ``[1, max_length]``."""
    _check_int("max_length", max_length, 1)
    if window is not None:
        _check_int("window", window, 1)
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(f"lengths must be a 1-D sequence of ints, got shape {lengths.shape} {lengths.dtype}")
    if lengths.size == 0:
        return [], 0.0
    bad = np.flatnonzero((lengths < 1) | (lengths > max_length))
    if bad.size:
        raise ValueError(f"lengths must be in [1, max_length = {max_length}], got lengths[{bad[0]}] = "
                         f"{int(lengths[bad[0]])}")
    window = lengths.size if window is None else window
    values = lengths.tolist()
    rows = []
    for lo in range(0, len(values), window):
        rows.extend([[lo + i for i in row] for row in _best_fit_decreasing(values[lo:lo + window], max_length)])
    return rows, float(lengths.sum()) / (len(rows) * max_length)


class Packed(NamedTuple):
    """``pack``'s result: the packed dataset, and what to log about it."""

    dataset: "object"  # datasets.Dataset with input_ids and position_ids
    fill_rate: float  # real tokens / (rows * max_length) after packing
    unpacked_fill_rate: float  # the same with one text a row (the padding packing removed)
    rows: int
    texts: int
    tokens: int


class _Pack:
    """The batched ``datasets.map`` function of ``pack`` (a class so ``datasets`` can fingerprint it)."""

    def __init__(self, max_length):
        self.max_length = max_length

    def __call__(self, batch):
        texts = batch["input_ids"]
        lengths = [len(t) for t in texts]
        bad = [n for n in lengths if not 1 <= n <= self.max_length]
        if bad:
            raise ValueError(f"every text must hold 1 to max_length = {self.max_length} tokens, got one of {bad[0]}")
        out_ids, out_pos = [], []
        for row in _best_fit_decreasing(lengths, self.max_length):
            ids, pos = [], []
            for i in row:
                ids.extend(texts[i])
                pos.extend(range(lengths[i]))
            out_ids.append(ids)
            out_pos.append(pos)
        return {"input_ids": out_ids, "position_ids": out_pos}


def _lengths(ds):
    """Tokens per row, from the Arrow offsets (the ids are not read)."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.data.column("input_ids"))


def pack(dataset, max_length, *, window=1000, num_proc=None):
    """Pack the texts of ``dataset`` (a ``datasets.Dataset`` with an ``input_ids`` column of texts of 1 to
    ``max_length`` tokens, as ``load_corpus(format="documents")`` gives) into rows of up to ``max_length`` tokens,
    best-fit decreasing over windows of ``window`` texts (one ``datasets.map`` batch; ``num_proc`` processes).

    Returns ``Packed(dataset, fill_rate, unpacked_fill_rate, rows, texts, tokens)``; ``dataset`` has ``input_ids``
    (int32 lists) and ``position_ids`` (int16 lists, int32 past 32768; 0 at each text's first token), cached memory-mapped like its
    source. Raises ``ValueError`` for a dataset with sentence-pair columns (their labels are per text), a text
    longer than ``max_length`` or an empty one, and bad arguments."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    _check_int("max_length", max_length, 1)
    _check_int("window", window, 1)
    if num_proc is not None:
        _check_int("num_proc", num_proc, 1)
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset must have an input_ids column, got columns {dataset.column_names}")
    other = [c for c in dataset.column_names if c != "input_ids"]
    if other:
        raise ValueError(f"dataset must hold texts only (input_ids) to be packed, got also {other} (sentence pairs "
                         "keep one text a row)")
    import pyarrow.compute as pc

    texts = len(dataset)
    if texts == 0:
        raise ValueError("dataset holds no texts")
    lengths = _lengths(dataset)
    tokens = int(pc.sum(lengths).as_py())
    shortest, longest = pc.min_max(lengths).values()
    if shortest.as_py() < 1 or longest.as_py() > max_length:
        raise ValueError(f"every text must hold 1 to max_length = {max_length} tokens, got one of "
                         f"{shortest.as_py() if shortest.as_py() < 1 else longest.as_py()}")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "position_ids": datasets.Sequence(datasets.Value("int16" if max_length <= 2**15 else "int32"))})
    packed = dataset.map(_Pack(max_length), batched=True, batch_size=window, features=features, num_proc=num_proc,
                         desc="packing")
    rows = len(packed)
    return Packed(packed, tokens / (rows * max_length), tokens / (texts * max_length), rows, texts, tokens)
