"""The global sample order: pure functions of (seed, epoch, position), O(1) time and memory.

``FeistelPermutation(n, key)`` is a bijection of ``[0, n)`` that is evaluated one element at a
time: a balanced Feistel network over the smallest even number of bits that covers ``n``, with
*cycle walking* (re-applying the network until the value falls inside ``[0, n)``; the network's
domain is at most ``4 n`` so the expected number of walks is below 4). Nothing of size ``n`` is ever
built, so a 10^9-sample dataset costs the same as a 10-sample one.

``epoch_permutation(n, seed, epoch, stream)`` derives the key from ``(seed, epoch, stream)``:
every epoch of every dataset (``stream``) is an independent-looking shuffle. ``GlobalOrder`` is the
single-dataset order: sample ``k`` of epoch ``e`` is ``permutation(seed, e)(k)``, position
``p = e * n + k``.

All arithmetic is on unsigned 64-bit integers (numpy, vectorised; ``__call__`` also takes one int).
The round function is SplitMix64's finaliser: changing it, the number of rounds or the key
derivation changes the order of every run (ITERATION ORDER BREAKING; ``ORDER_VERSION`` guards it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

ORDER_VERSION = 1
"""Bump when any function here changes which sample sits at which position."""
ROUNDS = 6
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix(*values: int) -> int:
    """A 64-bit hash of a few non-negative integers (order matters)."""
    h = np.zeros(1, dtype=np.uint64)
    for v in values:
        if v < 0:
            raise ValueError(f"mix() takes non-negative integers, got {v}")
        h = splitmix64(h ^ np.asarray([v & _M64], dtype=np.uint64))
    return int(h[0])


@dataclass(frozen=True)
class FeistelPermutation:
    """A keyed bijection of ``[0, n)``; ``perm(i)`` is O(1) expected time and O(1) memory."""

    n: int
    """Domain size (>= 1)."""
    key: int
    """64-bit key; different keys give (pseudo-)independent permutations."""
    _half_bits: int = field(init=False, repr=False)
    _round_keys: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"permutation size n must be an int >= 1, got {self.n!r}")
        if self.n > 1 << 62:
            raise ValueError(f"permutation size n({self.n}) exceeds 2^62")
        if not 0 <= self.key <= _M64:
            raise ValueError(f"key must be in [0, 2^64), got {self.key}")
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        object.__setattr__(self, "_half_bits", bits // 2)
        keys = np.asarray([mix(self.key, r) for r in range(ROUNDS)], dtype=np.uint64)
        object.__setattr__(self, "_round_keys", keys)

    def _network(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half_bits)
        mask = np.uint64((1 << self._half_bits) - 1)
        left, right = x >> half, x & mask
        for k in self._round_keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
        return (left << half) | right

    def apply(self, index: np.ndarray) -> np.ndarray:
        """``perm(i)`` for every ``i`` of an integer array (values in ``[0, n)``)."""
        x = np.asarray(index, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            bad = int(x[(x < 0) | (x >= self.n)][0])
            raise ValueError(f"index {bad} is outside [0, n({self.n}))")
        out = x.astype(np.uint64)
        walking = np.ones(out.shape, dtype=bool)
        n = np.uint64(self.n)
        while walking.any():
            out[walking] = self._network(out[walking])
            walking = out >= n
        return out.astype(np.int64)

    def __call__(self, index: int) -> int:
        return int(self.apply(np.asarray([index]))[0])


@functools.lru_cache(maxsize=256)
def epoch_permutation(n: int, seed: int, epoch: int, stream: int = 0) -> FeistelPermutation:
    """The shuffle of epoch ``epoch`` of a dataset of ``n`` samples (``stream`` tells datasets
    apart)."""
    for name, value in (("seed", seed), ("epoch", epoch), ("stream", stream)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return FeistelPermutation(n, mix(ORDER_VERSION, seed, stream, epoch))


@dataclass(frozen=True)
class GlobalOrder:
    """One dataset of ``n`` samples shuffled anew every epoch: position ``p`` -> sample index."""

    n: int
    seed: int
    stream: int = 0

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, index in the dataset) of global position ``position``."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch, k = divmod(position, self.n)
        return epoch, epoch_permutation(self.n, self.seed, epoch, self.stream)(k)

    def sample(self, epoch: int, k: int) -> int:
        """Sample ``k`` of epoch ``epoch``."""
        if not 0 <= k < self.n:
            raise ValueError(f"k({k}) is outside [0, n({self.n}))")
        return epoch_permutation(self.n, self.seed, epoch, self.stream)(k)
