"""``effbert.data.packing``: best-fit decreasing against a plain re-statement of the algorithm, every text placed
once, rows within ``max_length``, ``position_ids`` restarting per text, the fill rate worked out by hand."""

import random

import pytest

datasets = pytest.importorskip(
    "datasets", reason="the data side needs datasets, which is not installed here"
)

from effbert.data.packing import pack, pack_lengths, text_lengths


def _bfd_reference(lengths, max_length):
    """Best-fit decreasing as textbooks state it: longest first (ties in input order), into the fullest row it fits."""
    rows, used = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= max_length]
        if fits:
            r = min(fits, key=lambda r: (max_length - used[r] - lengths[i], r))
            rows[r].append(i)
            used[r] += lengths[i]
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def test_pack_lengths_is_best_fit_decreasing(seeded):
    rng = random.Random(seeded)
    for _ in range(30):
        max_length = rng.choice([8, 16, 128])
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 60))]
        rows, fill = pack_lengths(lengths, max_length)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= max_length for row in rows)
        assert fill == pytest.approx(sum(lengths) / (len(rows) * max_length))
        ref = _bfd_reference(lengths, max_length)
        # same rows as the reference, up to which of two equally full rows takes a text
        assert sorted(sorted(lengths[i] for i in r) for r in rows) == sorted(
            sorted(lengths[i] for i in r) for r in ref
        )


def test_pack_lengths_by_hand():
    rows, fill = pack_lengths([5, 3, 7, 1, 2, 6], 8)
    # decreasing: 7 -> row0 (free 1); 6 -> row1 (free 2); 5 -> row2 (free 3); 3 -> row2 (free 0);
    # 2 -> row1 (free 0); 1 -> row0 (free 0)
    assert rows == [[2, 3], [5, 4], [0, 1]]
    assert fill == 1.0
    rows, fill = pack_lengths([5, 5, 5, 5], 8, window=2)
    assert rows == [[0], [1], [2], [3]] and fill == 20 / 32
    rows, fill = pack_lengths([4, 4, 4, 4], 8, window=3)  # windows [0, 1, 2] and [3]: 3 rows, not 2
    assert rows == [[0, 1], [2], [3]] and fill == 16 / 24
    assert pack_lengths([], 8) == ([], 0.0)


def test_pack_lengths_errors():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9"):
        pack_lengths([3, 9], 8)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0"):
        pack_lengths([0], 8)
    with pytest.raises(ValueError, match="max_length"):
        pack_lengths([1], 0)
    with pytest.raises(ValueError, match="window"):
        pack_lengths([1], 8, window=0)
    with pytest.raises(ValueError, match="lengths must be a 1-D"):
        pack_lengths([[1, 2]], 8)


def test_pack_dataset(tmp_path, seeded):
    rng = random.Random(seeded)
    max_length = 16
    texts = [
        [2] + [rng.randint(5, 99) for _ in range(rng.randint(0, max_length - 2))] + [3]
        for _ in range(100)
    ]
    ds = datasets.Dataset.from_dict({"input_ids": texts})
    packed = pack(ds, max_length, window=32)
    tokens = sum(len(t) for t in texts)
    assert packed.texts == 100 and packed.tokens == tokens and packed.rows == len(packed.dataset)
    assert packed.fill_rate == pytest.approx(tokens / (packed.rows * max_length))
    assert packed.unpacked_fill_rate == pytest.approx(tokens / (100 * max_length))
    assert packed.fill_rate > packed.unpacked_fill_rate
    got = []
    for row in packed.dataset:
        ids, pos = row["input_ids"], row["position_ids"]
        assert len(ids) == len(pos) <= max_length and pos[0] == 0
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a))  # positions restart at each text
            got.append(ids[a:b])
    assert sorted(got) == sorted(texts)  # every text once, whole
    # the rows are pack_lengths' rows, window by window
    rows, fill = pack_lengths([len(t) for t in texts], max_length, window=32)
    assert len(rows) == packed.rows and fill == pytest.approx(packed.fill_rate)


def test_pack_errors():
    ds = datasets.Dataset.from_dict({"input_ids": [[2, 5, 3], [2] + [5] * 20 + [3]]})
    with pytest.raises(ValueError, match="1 to max_length = 16"):
        pack(ds, 16)
    pairs = datasets.Dataset.from_dict({"input_ids": [[2, 5, 3]], "next_sentence_label": [0]})
    with pytest.raises(ValueError, match="next_sentence_label"):
        pack(pairs, 16)
    with pytest.raises(TypeError, match="dataset"):
        pack([[1, 2]], 16)
    with pytest.raises(ValueError, match="max_length"):
        pack(ds, 0)
    with pytest.raises(ValueError, match="no texts"):
        pack(datasets.Dataset.from_dict({"input_ids": []}), 16)


def test_text_lengths_follow_views(seeded):
    rng = random.Random(seeded)
    texts = [[2] * rng.randint(1, 30) for _ in range(50)]
    ds = datasets.Dataset.from_dict({"input_ids": texts})
    assert text_lengths(ds).tolist() == [len(t) for t in texts]
    view = ds.shuffle(seed=seeded % 1000).select(range(10))
    assert text_lengths(view).tolist() == [len(t) for t in view["input_ids"]]
    packed = pack(view, 32)  # a view packs its own rows only
    assert packed.texts == 10 and packed.tokens == sum(len(t) for t in view["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        text_lengths(datasets.Dataset.from_dict({"text": ["a"]}))


def test_length_stats_stream(monkeypatch):
    """pack reads the token count and the extremes batch by batch (memory flat in the number of texts), and they
    equal the whole-array figures, views included."""
    from effbert.data import packing

    texts = [[2] * n for n in [3, 1, 7, 2, 5, 4, 6]]
    ds = datasets.Dataset.from_dict({"input_ids": texts})
    assert packing._length_stats(ds, batch_size=2) == (28, 1, 7)
    view = ds.select([0, 2, 4])
    assert packing._length_stats(view, batch_size=2) == (15, 3, 7)
    monkeypatch.setattr(
        packing, "text_lengths", lambda d: (_ for _ in ()).throw(AssertionError("whole array"))
    )
    assert pack(ds, 8).tokens == 28
