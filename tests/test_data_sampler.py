"""``effbert.data.sampler.ShuffleSampler``: every row once an epoch, keyed by (seed, epoch), uniform marginals, and
memory that does not grow with the dataset; ``PretrainingTrainer`` uses it instead of Trainer's ``RandomSampler``
(which holds a Python list of every row index)."""

import tracemalloc

import numpy as np
import pytest

from effbert.data.sampler import ShuffleSampler


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 1000, 65537, 100003])
def test_every_row_once_an_epoch(n):
    s = ShuffleSampler(n, seed=7, chunk=4096)
    assert len(s) == n
    for epoch in range(3):
        s.set_epoch(epoch)
        assert sorted(s) == list(range(n))


def test_order_keyed_by_seed_and_epoch():
    a = list(ShuffleSampler(1000, seed=1))
    assert a == list(ShuffleSampler(list(range(1000)), seed=1))  # any sized source: same order
    assert a != list(range(1000)) and a != list(ShuffleSampler(1000, seed=2))
    s = ShuffleSampler(1000, seed=1)
    s.set_epoch(1)
    assert list(s) != a
    s.set_epoch(0)
    assert list(s) == a
    # the chunk size is how much is computed at once, never the order
    assert list(ShuffleSampler(1000, seed=1, chunk=7)) == a


def test_every_seed_and_epoch_pair_has_its_own_keys():
    """The key derivation is injective over (seed, epoch) in [0, 2**64) each: (seed << 32) ^ epoch gave seed 0 at
    epoch 2**32 the order of seed 1 at epoch 0. Pairs that a shift, xor or sum of the two would confuse, and a
    grid of small and large values, all have distinct round keys and (the colliding pairs) distinct orders."""

    def order(seed, epoch):
        s = ShuffleSampler(1000, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 2**32) != order(1, 0)
    assert order(2**32, 0) != order(0, 1)
    top = 2**64 - 1
    assert order(top, top) != order(top, top - 1) and order(0, top) != order(top, 0)
    from effbert.data.sampler import _round_keys

    values = list(range(40)) + [2**31, 2**32, 2**32 + 1, 2**33, 2**63, top - 1, top]
    keys = {tuple(_round_keys(seed, epoch)) for seed in values for epoch in values}
    assert len(keys) == len(values) ** 2
    assert all(0 <= k < 2**64 for ks in keys for k in ks)
    for name, bad in (("seed", 2**64), ("epoch", 2**64), ("seed", -1)):
        with pytest.raises(ValueError, match=rf"{name} must be an int in \[0, 2\*\*64\)"):
            ShuffleSampler(3, seed=bad) if name == "seed" else ShuffleSampler(3).set_epoch(bad)


def test_numpy_integers_are_taken():
    """Any integral type (numpy's from a config or an index computation) is an int here; a bool is not."""
    want = ShuffleSampler(1000, seed=3, chunk=7)
    want.set_epoch(2)
    got = ShuffleSampler(np.int64(1000), seed=np.uint32(3), chunk=np.int16(7))
    got.set_epoch(np.int64(2))
    assert list(got) == list(want) and got.epoch == 2 and type(got.seed) is int
    with pytest.raises(ValueError, match="seed"):
        ShuffleSampler(10, seed=np.True_)
    with pytest.raises(ValueError, match="epoch"):
        ShuffleSampler(10).set_epoch(np.float64(1.0))


def test_marginals_uniform_and_neighbours_uncorrelated():
    n, draws = 8, 4000
    counts = np.zeros((n, n))
    for seed in range(draws):
        for pos, i in enumerate(ShuffleSampler(n, seed=seed)):
            counts[i, pos] += 1
    expected = draws / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 120  # 49 degrees of freedom: p < 1e-6 for a uniform draw to exceed this
    order = np.array(list(ShuffleSampler(200_000, seed=3)))
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.01


def _traced_peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_rows():
    first = lambda n: [i for i, _ in zip(ShuffleSampler(n), range(100))]  # noqa: E731
    assert _traced_peak(lambda: first(2_000_000)) < 4 << 20
    assert _traced_peak(lambda: first(200_000_000)) < 4 << 20


class _Rows:
    """A dataset of ``n`` rows that holds nothing."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": [i]}


@pytest.mark.requires("accelerate")  # Trainer
def test_pretraining_trainer_sampler_is_bounded(tmp_path):
    from transformers import TrainingArguments

    from effbert.training import PretrainingTrainer

    from test_pretrain import _tiny_mlm

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, data_seed=5, seed=1
    )
    trainer = PretrainingTrainer(model=_tiny_mlm(), args=args, train_dataset=_Rows(2_000_000))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ShuffleSampler) and sampler.seed == 5 and len(sampler) == 2_000_000
    # Trainer's RandomSampler draws randperm(n).tolist() here: a 72 MB list for 2 M rows
    assert _traced_peak(lambda: next(iter(trainer._get_train_sampler()))) < 4 << 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data_source": -1}, "data_source"),
        ({"data_source": object()}, "data_source"),
        ({"data_source": 3, "seed": -1}, "seed"),
        ({"data_source": 3, "chunk": 0}, "chunk"),
        ({"data_source": True}, "data_source"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShuffleSampler(**kwargs)
    with pytest.raises(ValueError, match="epoch"):
        ShuffleSampler(3).set_epoch(-1)
