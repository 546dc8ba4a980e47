"""TNF data side: the rare-word vocabulary, its sub-token sequences, and the rare-word spans of a batch.

Runs in the data loader. Finding spans is vectorised over the whole batch (no Python loop per token): words start at
a token that is not a continuation piece (WordPiece ``##x``; a BPE piece without the word-start marker), each word's
pieces are packed into a row of a ``[words, K]`` matrix, and rows are matched against the rare-word table at once.

    vocab = build_rare_vocab(word_counts, min_count=100, max_count=500)
    table = RareWordTable.build(vocab, tokenize=lambda w: tok.encode(w, add_special_tokens=False),
                                continuation=wordpiece_continuation(tok.convert_ids_to_tokens(range(len(tok)))))
    spans, slots = table.find(input_ids, lengths)   # the tensors note_update_ and note_mix take
"""

import numbers

import numpy as np
import torch

__all__ = ["build_rare_vocab", "wordpiece_continuation", "bpe_continuation", "RareWordTable"]


def build_rare_vocab(word_counts, min_count, max_count, max_size=None):
    """Words whose count lies in ``[min_count, max_count]``, most frequent first (ties by word), at most
    ``max_size`` of them. ``word_counts``: a mapping word -> count (a ``collections.Counter`` works)."""
    if not hasattr(word_counts, "items"):
        raise TypeError(
            f"word_counts must be a mapping word -> count, got {type(word_counts).__name__}"
        )
    for name, value in (("min_count", min_count), ("max_count", max_count)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if min_count > max_count:
        raise ValueError(f"min_count must be <= max_count, got [{min_count}, {max_count}]")
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, numbers.Integral) or max_size < 0
    ):
        raise ValueError(f"max_size must be None or an integer >= 0, got {max_size!r}")
    if not word_counts:
        return []
    words = np.array(list(word_counts.keys()), dtype=object)
    counts = np.fromiter(word_counts.values(), dtype=np.int64, count=len(words))
    keep = (counts >= min_count) & (counts <= max_count)
    words, counts = words[keep], counts[keep]
    order = np.lexsort((words.astype(str), -counts))  # count descending, then word
    chosen = words[order]
    return [str(w) for w in (chosen if max_size is None else chosen[:max_size])]


def wordpiece_continuation(tokens, prefix="##"):
    """Bool ``[V]``: True for WordPiece continuation pieces (``##ing``)."""
    return torch.tensor(
        [t.startswith(prefix) and len(t) > len(prefix) for t in tokens], dtype=torch.bool
    )


def bpe_continuation(tokens, word_start="\u0120", special=()):
    """Bool ``[V]``: True for byte-level BPE pieces that continue a word (no leading ``word_start`` marker, GPT-2 /
    RoBERTa style). ``special`` tokens (``<s>``, ``</s>``, ``<pad>``) always start a word."""
    special = set(special)
    return torch.tensor(
        [not (t.startswith(word_start) or t in special) for t in tokens], dtype=torch.bool
    )


_MOD = 2**31 - 1  # a prime: two 31-bit polynomial hashes make one 62-bit key without int64 overflow


def _row_keys(rows):
    """A 62-bit hash of each row of piece ids (-1 / -2 padding included) from two polynomial hashes mod 2^31 - 1."""
    K = rows.shape[1]
    vals = (rows + 2) % _MOD  # small non-negative integers
    keys = []
    for base in (1_000_003, 998_244_353):
        powers = torch.ones(K, dtype=torch.int64)
        for k in range(1, K):
            powers[k] = powers[k - 1] * base % _MOD
        keys.append((vals * powers.to(rows.device)).remainder(_MOD).sum(1).remainder(_MOD))
    return keys[0] * 2**31 + keys[1]


class RareWordTable:
    """Rare words as padded sub-token rows ``pieces [R, K]`` (-1 after a word's last piece); slot = row index."""

    def __init__(self, words, pieces, continuation):
        if (
            not isinstance(continuation, torch.Tensor)
            or continuation.dtype != torch.bool
            or continuation.dim() != 1
        ):
            raise TypeError(
                "continuation must be a bool tensor [V] (True = the piece continues a word)"
            )
        if not isinstance(pieces, torch.Tensor) or pieces.dtype != torch.int64 or pieces.dim() != 2:
            raise TypeError("pieces must be an int64 tensor [R, K]")
        if pieces.shape[0] != len(words):
            raise ValueError(
                f"pieces must have one row per word ({len(words)}), got {pieces.shape[0]}"
            )
        self.words = list(words)
        self.pieces = pieces
        self.continuation = continuation
        self.slot_of = {w: i for i, w in enumerate(self.words)}
        # Rows are matched by a 62-bit hash, sorted once, then confirmed piece by piece: a batch costs a binary
        # search per word instead of a sort of the whole table.
        keys = _row_keys(pieces)
        self._keys, self._order = torch.sort(keys)
        self._unique_keys = (
            bool((self._keys[1:] != self._keys[:-1]).all()) if len(keys) > 1 else True
        )

    @classmethod
    def build(cls, words, tokenize, continuation, max_pieces=None):
        """Tokenize each rare word once (``tokenize(word) -> list of ids``). A word must start with a word-start
        piece and continue with continuation pieces, else it could never be found in a batch (a ValueError says
        which). Two words with the same pieces: the first keeps the slot, the later one is dropped."""
        if not isinstance(continuation, torch.Tensor) or continuation.dtype != torch.bool:
            raise TypeError(
                "continuation must be a bool tensor [V] (True = the piece continues a word)"
            )
        cont = continuation.tolist()
        kept, rows, seen = [], [], set()
        for w in words:
            ids = [int(i) for i in tokenize(w)]
            if not ids:
                raise ValueError(f"word {w!r} tokenizes to no pieces")
            bad = [i for i in ids if not 0 <= i < len(cont)]
            if bad:
                raise ValueError(
                    f"word {w!r}: piece ids {bad} outside the vocabulary of {len(cont)}"
                )
            if cont[ids[0]] or not all(cont[i] for i in ids[1:]):
                raise ValueError(
                    f"word {w!r} tokenizes to {ids}: it must be one word-start piece followed by "
                    "continuation pieces"
                )
            if tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
            kept.append(w)
            rows.append(ids)
        k = max((len(r) for r in rows), default=1)
        if max_pieces is not None:
            k = max(k, int(max_pieces))
        pieces = torch.full((len(rows), k), -1, dtype=torch.int64)
        for i, r in enumerate(rows):
            pieces[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        return cls(kept, pieces, continuation)

    @property
    def max_pieces(self):
        return self.pieces.shape[1]

    def __len__(self):
        return len(self.words)

    def find(self, input_ids, lengths=None, position_ids=None):
        """Rare-word occurrences in a batch.

        ``input_ids``: int64 ``[B, N]``; ``lengths``: optional ``[B]`` real tokens per sequence, each in
        ``[0, N]`` (the rest is padding; ``ValueError`` otherwise); ``position_ids``: optional integer ``[B, N]``
        of packed rows (0 at each text's first token): a word never continues across a restart. Returns ``spans`` int64 ``[M, 4]`` rows
        ``(batch, start, end_exclusive, slot)`` in (batch, position) order, and ``slots`` int64 ``[B, N]``: each piece of a rare word holds its slot, every other token
        -1. Both are on ``input_ids``' device.
        """
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dtype != torch.int64
            or input_ids.dim() != 2
        ):
            raise TypeError("input_ids must be an int64 tensor [B, N]")
        B, N = input_ids.shape
        dev = input_ids.device
        V = self.continuation.shape[0]
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids must be in [0, {V}) (the continuation table's vocabulary)")
        pos = torch.arange(N, device=dev)
        if lengths is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=dev)
        else:
            lengths = torch.as_tensor(lengths, device=dev)
            if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"lengths must be an integer tensor [B] = [{B}], got {tuple(lengths.shape)} "
                    f"{lengths.dtype}"
                )
            if B and (int(lengths.min()) < 0 or int(lengths.max()) > N):
                bad = int(torch.nonzero((lengths < 0) | (lengths > N))[0, 0])
                raise ValueError(
                    f"lengths must be in [0, N = {N}], got lengths[{bad}] = {int(lengths[bad])}"
                )
            valid = pos[None, :] < lengths[:, None]
        if position_ids is not None:
            if (
                not isinstance(position_ids, torch.Tensor)
                or position_ids.shape != (B, N)
                or position_ids.dtype.is_floating_point
                or position_ids.dtype == torch.bool
            ):
                raise ValueError(f"position_ids must be an integer tensor [B, N] = [{B}, {N}]")
        empty = (
            torch.empty(0, 4, dtype=torch.int64, device=dev),
            torch.full((B, N), -1, dtype=torch.int64, device=dev),
        )
        if B * N == 0 or len(self) == 0:
            return empty
        # index_select rather than advanced indexing throughout: several times faster on the CPU.
        cont = self.continuation.to(dev).index_select(0, input_ids.reshape(-1)).view(B, N)
        # A word starts at a non-continuation piece, at each sequence's first token, and at every padding token
        # (so padding never extends a word).
        start = ~cont | ~valid | (pos == 0)[None, :]
        if position_ids is not None:
            start = start | (position_ids.to(dev) == 0)
        flat_start = start.reshape(-1)
        ids = input_ids.reshape(-1)
        word_of = torch.cumsum(flat_start.to(torch.int64), 0) - 1  # word index of each token
        starts = torch.nonzero(flat_start).squeeze(1)  # flat position of each word's first piece
        W = starts.shape[0]
        ends = torch.cat([starts[1:], torch.tensor([B * N], device=dev)])
        length = ends - starts
        K = self.max_pieces
        k = torch.arange(B * N, device=dev) - starts.index_select(
            0, word_of
        )  # piece index inside its word
        # Pieces past the K-th land in a spare column that is dropped (such words cannot match anyway).
        rows = torch.full((W, K + 1), -1, dtype=torch.int64, device=dev)
        rows.view(-1).scatter_(0, word_of * (K + 1) + k.clamp_max(K), ids)
        rows = rows[:, :K]
        # Words longer than any rare word, and padding, can match nothing.
        unmatchable = (length > K) | ~valid.reshape(-1).index_select(0, starts)
        rows = torch.cat([torch.where(unmatchable, -2, rows[:, 0]).unsqueeze(1), rows[:, 1:]], 1)
        table = self.pieces.to(dev)
        R = table.shape[0]
        if self._unique_keys:
            keys, order = self._keys.to(dev), self._order.to(dev)
            wkeys = _row_keys(rows)
            at = torch.searchsorted(keys, wkeys).clamp_max(R - 1)
            cand = order.index_select(0, at)
            hit = (keys.index_select(0, at) == wkeys) & (table.index_select(0, cand) == rows).all(
                1
            )  # confirmed: no false match on a collision
            word_slot = torch.where(hit, cand, torch.full_like(cand, -1))
        else:  # two rare words share a hash (about 1e-9 for 1e5 words): exact matching by sorting everything
            _, inverse = torch.unique(torch.cat([table, rows]), dim=0, return_inverse=True)
            slot_of_unique = torch.full(
                (int(inverse.max()) + 1,), -1, dtype=torch.int64, device=dev
            )
            slot_of_unique[inverse[:R]] = torch.arange(R, device=dev)
            word_slot = slot_of_unique[inverse[R:]]
        rare = word_slot >= 0
        which = torch.nonzero(rare).squeeze(1)
        s = starts.index_select(0, which)
        spans = torch.stack(
            [
                s // N,
                s % N,
                s % N + length.index_select(0, which),
                word_slot.index_select(0, which),
            ],
            1,
        )
        slots = torch.where(
            valid.reshape(-1), word_slot.index_select(0, word_of), torch.full_like(ids, -1)
        )
        slots = slots.view(B, N)
        return spans.contiguous(), slots.contiguous()
