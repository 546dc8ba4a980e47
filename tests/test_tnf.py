"""TNF data side: the rare vocabulary, its WordPiece/BPE pieces, and span finding against a loop over tokens."""

import random
from collections import Counter

import pytest
import torch

from effbert.nn import NoteDictionary
from effbert.data.tnf import (
    RareWordTable,
    bpe_continuation,
    build_rare_vocab,
    wordpiece_continuation,
)

# A toy WordPiece vocabulary: specials, word-start pieces, continuation pieces.
VOCAB = [
    "[PAD]",
    "[CLS]",
    "[SEP]",
    "the",
    "cat",
    "dog",
    "un",
    "believ",
    "read",
    "ran",
    "a",
    "##able",
    "##s",
    "##ing",
    "##y",
    "##ly",
    "##ed",
    "##believ",
    "##ably",
]
IDS = {t: i for i, t in enumerate(VOCAB)}


def wordpiece(word):
    """Greedy longest-match-first WordPiece over VOCAB (enough for the test words)."""
    out, rest, first = [], word, True
    while rest:
        for end in range(len(rest), 0, -1):
            piece = rest[:end] if first else "##" + rest[:end]
            if piece in IDS:
                out.append(IDS[piece])
                rest = rest[end:]
                first = False
                break
        else:
            raise ValueError(f"cannot tokenize {word!r}")
    return out


def test_build_rare_vocab_frequency_band():
    counts = Counter(
        {"the": 1000, "cat": 50, "dog": 50, "unbelievable": 7, "readable": 12, "zebra": 3, "x": 100}
    )
    assert build_rare_vocab(counts, 5, 60) == ["cat", "dog", "readable", "unbelievable"]
    assert build_rare_vocab(counts, 5, 60, max_size=2) == ["cat", "dog"]
    assert build_rare_vocab(counts, 3, 3) == ["zebra"]
    assert build_rare_vocab({}, 1, 2) == []
    with pytest.raises(ValueError, match="min_count must be <= max_count"):
        build_rare_vocab(counts, 10, 5)
    with pytest.raises(TypeError, match="word_counts must be a mapping"):
        build_rare_vocab([("a", 1)], 1, 2)


def test_continuation_tables():
    cont = wordpiece_continuation(VOCAB)
    assert cont.tolist() == [t.startswith("##") for t in VOCAB]
    bpe = bpe_continuation(["<s>", "\u0120the", "\u0120cat", "s", "</s>"], special=("<s>", "</s>"))
    assert bpe.tolist() == [False, False, False, True, False]


def test_table_rejects_words_that_cannot_occur():
    cont = wordpiece_continuation(VOCAB)
    with pytest.raises(ValueError, match="one word-start piece followed by continuation pieces"):
        RareWordTable.build(["bad"], lambda w: [IDS["##s"], IDS["cat"]], cont)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        RareWordTable.build(["bad"], lambda w: [999], cont)
    table = RareWordTable.build(
        ["cats", "cats2"], lambda w: wordpiece("cats"), cont
    )  # same pieces: first wins
    assert table.words == ["cats"]


def loop_find(table, input_ids, lengths):
    """The definition, token by token."""
    cont = table.continuation.tolist()
    rare = {tuple(p for p in row if p >= 0): s for s, row in enumerate(table.pieces.tolist())}
    B, N = input_ids.shape
    spans, slots = [], [[-1] * N for _ in range(B)]
    for b in range(B):
        L = N if lengths is None else int(lengths[b])
        t = 0
        while t < L:
            e = t + 1
            while e < L and cont[int(input_ids[b, e])]:
                e += 1
            s = rare.get(tuple(int(i) for i in input_ids[b, t:e]))
            if s is not None:
                spans.append([b, t, e, s])
                for p in range(t, e):
                    slots[b][p] = s
            t = e
    return torch.tensor(spans, dtype=torch.int64).view(-1, 4), torch.tensor(
        slots, dtype=torch.int64
    )


def test_find_spans_in_a_sentence():
    cont = wordpiece_continuation(VOCAB)
    table = RareWordTable.build(["unbelievable", "cats", "reading"], wordpiece, cont)
    sentence = [
        "[CLS]",
        "the",
        "cats",
        "ran",
        "unbelievably",
        "reading",
        "the",
        "cat",
        "[SEP]",
        "[PAD]",
        "[PAD]",
    ]
    ids = torch.tensor(
        [sum((wordpiece(w) if not w.startswith("[") else [IDS[w]] for w in sentence), [])]
    )
    spans, slots = table.find(ids, torch.tensor([ids.shape[1] - 2]))
    # "unbelievably" = un ##believ... is not "unbelievable": a longer word never matches a prefix.
    pieces = [VOCAB[i] for i in ids[0].tolist()]
    found = [
        ("".join(p.replace("##", "") for p in pieces[s:e]), slot)
        for _, s, e, slot in spans.tolist()
    ]
    assert found == [("cats", 1), ("reading", 2)]
    want_spans, want_slots = loop_find(table, ids, torch.tensor([ids.shape[1] - 2]))
    assert torch.equal(spans, want_spans) and torch.equal(slots, want_slots)


@pytest.mark.parametrize("with_lengths", [True, False])
def test_find_matches_loop_on_random_batches(with_lengths, seeded):
    rng = random.Random(seeded)
    cont = wordpiece_continuation(VOCAB)
    starts = [i for i, t in enumerate(VOCAB) if not t.startswith("##") and not t.startswith("[")]
    conts = [i for i, t in enumerate(VOCAB) if t.startswith("##")]
    # Rare words of 1 to 3 pieces, made from the vocabulary directly.
    rare_rows = {
        tuple([rng.choice(starts)] + [rng.choice(conts) for _ in range(rng.randint(0, 2))])
        for _ in range(12)
    }
    rare_rows = sorted(rare_rows)
    table = RareWordTable.build(
        [f"w{i}" for i in range(len(rare_rows))], lambda w: list(rare_rows[int(w[1:])]), cont
    )
    B, N = 7, 29
    ids = torch.empty(B, N, dtype=torch.int64)
    for b in range(B):
        toks = []
        while len(toks) < N:
            if rng.random() < 0.3:
                toks += list(rng.choice(rare_rows))  # plant a rare word
            else:
                toks += [rng.choice(starts)] + [rng.choice(conts) for _ in range(rng.randint(0, 3))]
        ids[b] = torch.tensor(toks[:N])
    lengths = torch.randint(1, N + 1, (B,)) if with_lengths else None
    spans, slots = table.find(ids, lengths)
    want_spans, want_slots = loop_find(table, ids, lengths)
    assert torch.equal(spans, want_spans)
    assert torch.equal(slots, want_slots)
    assert spans.shape[0] > 0
    table._unique_keys = False  # the exact path taken when two rare words share a hash
    spans2, slots2 = table.find(ids, lengths)
    assert torch.equal(spans2, want_spans) and torch.equal(slots2, want_slots)


def test_find_feeds_the_ops(seeded):
    """spans and slots from a batch go straight into note_update_ and note_mix."""
    cont = wordpiece_continuation(VOCAB)
    table = RareWordTable.build(["cats", "reading", "dog"], wordpiece, cont)
    ids = torch.tensor(
        [
            [IDS["[CLS]"], IDS["cat"], IDS["##s"], IDS["dog"], IDS["[SEP]"]],
            [IDS["[CLS]"], IDS["read"], IDS["##ing"], IDS["[SEP]"], IDS["[PAD]"]],
        ]
    )
    spans, slots = table.find(ids, torch.tensor([5, 4]))
    assert spans.tolist() == [[0, 1, 3, 0], [0, 3, 4, 2], [1, 1, 3, 1]]
    nd = NoteDictionary(len(table), 8, window=1)
    hidden = torch.randn(2, 5, 8)
    nd.update(hidden, spans, torch.tensor([5, 4]))
    assert nd.counts.tolist() == [1, 1, 1]
    out = nd.mix(torch.randn(2, 5, 8), slots)
    assert out.shape == (2, 5, 8)


def test_find_edge_cases():
    cont = wordpiece_continuation(VOCAB)
    table = RareWordTable.build(["cats"], wordpiece, cont)
    spans, slots = table.find(torch.empty(0, 5, dtype=torch.int64))
    assert spans.shape == (0, 4) and slots.shape == (0, 5)
    # A sequence that starts with a continuation piece: its first token still starts a word.
    spans, _ = table.find(torch.tensor([[IDS["##s"], IDS["cat"], IDS["##s"]]]))
    assert spans.tolist() == [[0, 1, 3, 0]]
    # Length cuts the word: "cat" alone is not "cats".
    spans, slots = table.find(torch.tensor([[IDS["cat"], IDS["##s"]]]), torch.tensor([1]))
    assert spans.shape == (0, 4) and slots.tolist() == [[-1, -1]]
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 19\)"):
        table.find(torch.tensor([[99]]))
    with pytest.raises(TypeError, match="input_ids must be an int64 tensor"):
        table.find(torch.tensor([[1.0]]))


@pytest.mark.parametrize(
    "lengths,bad", [([3, 4], "lengths\\[1\\] = 4"), ([-1, 2], "lengths\\[0\\] = -1")]
)
def test_find_rejects_lengths_outside_the_sequence(lengths, bad):
    """A length past N (or negative) names the argument instead of silently treating the row as full (or empty)."""
    table = RareWordTable.build(["cats"], wordpiece, wordpiece_continuation(VOCAB))
    ids = torch.tensor([[IDS["cat"], IDS["##s"], IDS["cat"]]] * 2)
    with pytest.raises(ValueError, match=rf"lengths must be in \[0, N = 3\], got {bad}"):
        table.find(ids, torch.tensor(lengths))
    spans, _ = table.find(ids, torch.tensor([0, 3]))  # the bounds themselves are fine
    assert spans.tolist() == [[1, 0, 2, 0]]
