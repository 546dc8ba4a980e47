"""A shuffling sampler whose memory does not grow with the dataset.

``torch.utils.data.RandomSampler`` (what ``transformers.Trainer`` uses, and accelerate's ``SeedableRandomSampler``
that replaces it) draws ``torch.randperm(n).tolist()`` each epoch: a Python list of every row index, about 36 bytes
a row (3.4 M rows of a 1 GB corpus: 120 MB; a 100 GB corpus: 12 GB) in the training process. ``ShuffleSampler``
gives a pseudo-random permutation of ``range(n)`` computed on the fly from the index: an 8-round Feistel network on
the smallest even number of bits covering ``n``, keyed by ``(seed, epoch)``, with cycle-walking (indices the network
maps to ``>= n`` are skipped), evaluated with numpy in chunks of ``chunk`` indices. Memory is O(chunk), not O(n).

Deviation (documented): the order is a keyed pseudo-random permutation (the construction of Black and Rogaway,
"Ciphers with Arbitrary Finite Domains", CT-RSA 2002), not a uniform draw over all n! orders as ``randperm`` makes;
every row is visited exactly once an epoch, and the order is the same on every data-parallel rank for the same
``(seed, epoch)`` (accelerate's batch sharding relies on this).
"""

import numbers
import operator

import numpy as np
import torch

__all__ = ["ShuffleSampler"]

_ROUNDS = 8
_M64 = (1 << 64) - 1
_KEY_ROUNDS = (
    0x243F6A8885A308D3,
    0x13198A2E03707344,
    0xA4093822299F31D0,
    0x082EFA98EC4E6C89,
)  # digits of pi


def _splitmix64(x):
    """splitmix64's finaliser (Steele, Lea and Flood, OOPSLA 2014) on Python ints: the round keys."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _integer(name, value, low, high=None):
    """``value`` as a Python int in ``[low, high)`` (``high`` a power of 2 or None): any integral type (numpy's
    too, through ``operator.index``), never a bool; ``ValueError`` naming ``name`` otherwise."""
    try:
        v = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < low or (high is not None and v >= high):
        bound = (
            f"an int >= {low}" if high is None else f"an int in [{low}, 2**{high.bit_length() - 1})"
        )
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return v


def _round_keys(seed, epoch):
    """The Feistel network's ``_ROUNDS`` 64-bit round keys of ``(seed, epoch)``, each in ``[0, 2**64)``.

    Injective: ``(seed, epoch)`` goes through a 4-round Feistel network on its two 64-bit halves (a bijection of
    the 128-bit pair, splitmix64 as the round function, so each half of the result depends on both), whose two
    halves are the first two round keys; the others are derived from those. Two pairs therefore never share their
    keys (``(seed << 32) ^ epoch`` gave seed 0 / epoch 2**32 the keys, and the order, of seed 1 / epoch 0)."""
    left, right = seed, epoch
    for c in _KEY_ROUNDS:
        left, right = right, left ^ _splitmix64(right ^ c)
    return [left, right] + [_splitmix64(left ^ _splitmix64(right + r)) for r in range(2, _ROUNDS)]


class ShuffleSampler(torch.utils.data.Sampler):
    """Every index of ``range(len(data_source))`` once an epoch, in a pseudo-random order keyed by ``(seed, epoch)``.

    ``data_source``: anything with ``len()`` (a ``datasets.Dataset``), or an int, the number of rows.
    ``seed``: an int in ``[0, 2**64)``. ``chunk``: indices computed at once (memory is O(chunk)).
    ``set_epoch(epoch)`` (called by ``Trainer`` each epoch; an int in ``[0, 2**64)``) changes the order. Any
    integral type is taken (numpy's ints too), not a bool. Distinct ``(seed, epoch)`` pairs get distinct keys
    (``_round_keys``). Raises ``ValueError`` naming the argument on bad input.
    """

    def __init__(self, data_source, seed=0, chunk=1 << 16):
        if isinstance(data_source, numbers.Integral) and not isinstance(
            data_source, (bool, np.bool_)
        ):
            n = operator.index(data_source)  # numpy's ints too
        else:
            try:
                n = None if isinstance(data_source, (bool, np.bool_)) else len(data_source)
            except TypeError:
                n = None
            if n is None:
                raise ValueError(
                    f"data_source must be an int or have a length, got {type(data_source).__name__}"
                )
        if n < 0:
            raise ValueError(f"data_source must hold >= 0 rows, got {n}")
        self.n = n
        self.seed = _integer("seed", seed, 0, 1 << 64)
        self.chunk = _integer("chunk", chunk, 1)
        self.epoch = 0
        self.half = (
            max(1, ((n - 1).bit_length() + 1) // 2) if n > 1 else 1
        )  # bits of each Feistel half

    def set_epoch(self, epoch):
        self.epoch = _integer("epoch", epoch, 0, 1 << 64)

    def __len__(self):
        return self.n

    def _keys(self):
        return _round_keys(self.seed, self.epoch)

    def permute(self, x):
        """The Feistel network on ``x`` (uint64 array of values < 4**half): a bijection of [0, 4**half)."""
        h, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & mask
        with np.errstate(over="ignore"):
            for k in self._keys():
                f = right ^ np.uint64(k)  # splitmix64's finaliser, keyed, top bits kept
                f = (f ^ (f >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                f = (f ^ (f >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                f = (f ^ (f >> np.uint64(31))) >> np.uint64(64 - self.half)
                left, right = right, left ^ (f & mask)
        return (left << h) | right

    def __iter__(self):
        domain = 1 << (2 * self.half)
        if self.n <= 1:
            yield from range(self.n)
            return
        for lo in range(0, domain, self.chunk):
            y = self.permute(np.arange(lo, min(domain, lo + self.chunk), dtype=np.uint64))
            yield from y[y < self.n].tolist()
