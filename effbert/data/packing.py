"""Packing: several texts in one row of up to ``max_length`` real tokens, ``position_ids`` restarting at 0 at each
text's first token, so the model keeps the texts apart (attention never crosses a restart) and each text's [CLS] is
position 0. This is the layout of transformers' ``DataCollatorWithFlattening`` (a restart of ``position_ids`` marks
a text boundary), done once on the dataset instead of per batch.

The algorithm is best-fit decreasing over a window (Johnson 1973; Krell et al. 2021, "Efficient Sequence Packing
without Cross-contamination", compare it with their shortest-pack-first histogram packing): the texts of a window
of ``window`` consecutive texts are taken longest first, and each goes into the open row whose free space is the
smallest that still holds it, or a new row. Texts never move between windows, so memory is one window, and the
order of texts is kept up to the window.

    packed = pack(ds, max_length=512)                      # packed.dataset, packed.fill_rate (log it)
    rows, fill = pack_lengths(text_lengths(ds), 512)       # the same algorithm on bare lengths (benchmarks)
"""

import bisect
import heapq
import numbers
from typing import NamedTuple

import numpy as np

__all__ = ["pack_lengths", "pack", "Packed", "text_lengths"]


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _best_fit_decreasing(lengths, max_length):
    """Rows (lists of indices into ``lengths``) of one window, best-fit decreasing; among rows with equally little
    room the oldest. Open rows are kept in buckets by free room (at most ``max_length`` of them), so a text costs
    a binary search over the room values, not a pass over the rows."""
    order = sorted(
        range(len(lengths)), key=lambda i: -lengths[i]
    )  # stable: equal lengths keep their order
    rows = []
    rooms = []  # sorted room values that have open rows
    bucket = {}  # room -> heap of row indices
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(rooms, n)
        if at == len(rooms):
            rows.append([i])
            r, room = len(rows) - 1, max_length - n
        else:
            room = rooms[at]
            heap = bucket[room]
            r = heapq.heappop(heap)
            if not heap:
                del bucket[room]
                rooms.pop(at)
            rows[r].append(i)
            room -= n
        if room > 0:
            if room not in bucket:
                bucket[room] = []
                bisect.insort(rooms, room)
            heapq.heappush(bucket[room], r)
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
        raise ValueError(
            f"lengths must be a 1-D sequence of ints, got shape {lengths.shape} {lengths.dtype}"
        )
    if lengths.size == 0:
        return [], 0.0
    bad = np.flatnonzero((lengths < 1) | (lengths > max_length))
    if bad.size:
        raise ValueError(
            f"lengths must be in [1, max_length = {max_length}], got lengths[{bad[0]}] = "
            f"{int(lengths[bad[0]])}"
        )
    window = lengths.size if window is None else window
    values = lengths.tolist()
    rows = []
    for lo in range(0, len(values), window):
        rows.extend(
            [
                [lo + i for i in row]
                for row in _best_fit_decreasing(values[lo : lo + window], max_length)
            ]
        )
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
    """The batched ``datasets.map`` function of ``pack`` on Arrow batches (a class so ``datasets`` can fingerprint
    it): the rows are gathered with numpy, not built token by token in Python."""

    def __init__(self, max_length, pos_type):
        self.max_length = max_length
        self.pos_type = pos_type

    def __call__(self, table):
        import pyarrow as pa
        import pyarrow.compute as pc

        col = table.column("input_ids")
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths.min() < 1 or lengths.max() > self.max_length):
            raise ValueError(f"every text must hold 1 to max_length = {self.max_length} tokens")
        starts = np.cumsum(lengths) - lengths
        rows = _best_fit_decreasing(lengths.tolist(), self.max_length)
        order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=lengths.size)
        n = lengths[order]
        first = np.cumsum(n) - n  # where each placed text begins in the output
        within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n)
        ids = values[np.repeat(starts[order], n) + within]
        row_tokens = (
            np.add.reduceat(n, np.cumsum([0] + [len(r) for r in rows[:-1]])) if rows else n[:0]
        )
        offsets = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int32))
        return pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.astype(np.int32))),
                "position_ids": pa.ListArray.from_arrays(
                    offsets, pa.array(within.astype(self.pos_type))
                ),
            }
        )


def _lengths(ds):
    """Tokens per row, from the Arrow offsets (the ids are not read)."""
    import pyarrow.compute as pc

    return pc.list_value_length(ds.data.column("input_ids"))


def _length_stats(dataset, batch_size=100_000):
    """(tokens, shortest, longest) of a dataset's texts, streamed a batch of rows at a time: memory does not grow
    with the number of texts (an array of every length would, by 8 bytes a text, in every forked worker too)."""
    import pyarrow.compute as pc

    tokens, shortest, longest = 0, None, 0
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        lengths = pc.list_value_length(table.column("input_ids"))
        lo, hi = pc.min_max(lengths).values()
        tokens += int(pc.sum(lengths).as_py() or 0)
        shortest = lo.as_py() if shortest is None else min(shortest, lo.as_py())
        longest = max(longest, hi.as_py())
    return tokens, shortest, longest


def text_lengths(dataset):
    """The tokens of each row of ``dataset`` (a ``datasets.Dataset`` with ``input_ids``, e.g. ``load_corpus``'s
    texts: real sentence and paragraph lengths for ``pack_lengths``), as an int64 numpy array ``[rows]``, read from
    the Arrow offsets without touching the ids. Honours ``select`` / ``shuffle`` / ``train_test_split`` views."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"dataset must have an input_ids column, got columns {dataset.column_names}"
        )
    lengths = np.asarray(_lengths(dataset).to_numpy(zero_copy_only=False), dtype=np.int64)
    if dataset._indices is not None:  # a view (select, shuffle): its rows through the index mapping
        lengths = lengths[dataset._indices.column(0).to_numpy()]
    return lengths


def pack(dataset, max_length, *, window=1000, num_proc=None):
    """Pack the texts of ``dataset`` (a ``datasets.Dataset`` with an ``input_ids`` column of texts of 1 to
    ``max_length`` tokens, as ``load_corpus(format="documents" | "lines")`` gives) into rows of up to ``max_length`` tokens,
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
        raise ValueError(
            f"dataset must have an input_ids column, got columns {dataset.column_names}"
        )
    other = [c for c in dataset.column_names if c != "input_ids"]
    if other:
        raise ValueError(
            f"dataset must hold texts only (input_ids) to be packed, got also {other} (sentence pairs "
            "keep one text a row)"
        )
    texts = len(dataset)
    if texts == 0:
        raise ValueError("dataset holds no texts")
    tokens, shortest, longest = _length_stats(dataset)
    if shortest < 1 or longest > max_length:
        raise ValueError(
            f"every text must hold 1 to max_length = {max_length} tokens, got one of "
            f"{shortest if shortest < 1 else longest}"
        )
    pos_type = np.int16 if max_length <= 2**15 else np.int32
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "position_ids": datasets.Sequence(datasets.Value(np.dtype(pos_type).name)),
        }
    )
    packed = dataset.with_format("arrow").map(
        _Pack(max_length, pos_type),
        batched=True,
        batch_size=window,
        features=features,
        num_proc=num_proc,
        desc="packing",
    )
    packed = packed.with_format(None)
    rows = len(packed)
    return Packed(
        packed, tokens / (rows * max_length), tokens / (texts * max_length), rows, texts, tokens
    )
