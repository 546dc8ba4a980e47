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

import numpy as np
import torch

__all__ = ["ShuffleSampler"]

_ROUNDS = 8
_M64 = (1 << 64) - 1


def _splitmix64(x):
    """splitmix64's finaliser (Steele, Lea and Flood, OOPSLA 2014) on Python ints: the round keys."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class ShuffleSampler(torch.utils.data.Sampler):
    """Every index of ``range(len(data_source))`` once an epoch, in a pseudo-random order keyed by ``(seed, epoch)``.

    ``data_source``: anything with ``len()`` (a ``datasets.Dataset``), or an int, the number of rows.
    ``seed``: int >= 0. ``chunk``: indices computed at once (memory is O(chunk)). ``set_epoch(epoch)`` (called by
    ``Trainer`` each epoch) changes the order. Raises ``ValueError`` naming the argument on bad input.
    """

    def __init__(self, data_source, seed=0, chunk=1 << 16):
        n = data_source if isinstance(data_source, int) and not isinstance(data_source, bool) else None
        if n is None:
            try:
                n = len(data_source)
            except TypeError:
                raise ValueError(f"data_source must be an int or have a length, got {type(data_source).__name__}") \
                    from None
        if n < 0:
            raise ValueError(f"data_source must hold >= 0 rows, got {n}")
        for name, v, lo in (("seed", seed, 0), ("chunk", chunk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.n, self.seed, self.chunk, self.epoch = n, seed, chunk, 0
        self.half = max(1, ((n - 1).bit_length() + 1) // 2) if n > 1 else 1  # bits of each Feistel half

    def set_epoch(self, epoch):
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self):
        return self.n

    def _keys(self):
        base = _splitmix64((self.seed << 32) ^ self.epoch)
        return [_splitmix64(base + r) for r in range(_ROUNDS)]

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
