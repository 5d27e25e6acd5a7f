"""Named, deterministic random streams for the synthetic generator.

Every split and data set draws from its own stream, seeded from ``(seed, stream name)``, so
changing the size of one split never changes the content of another (val stays identical when
train grows). Draws come from numpy's PCG64 in blocks, because the generator makes hundreds of
scalar draws per scene and numpy's per-call overhead would otherwise dominate.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_BLOCK = 4096


class Stream:
    """A seeded source of uniform doubles with the few helpers the generator needs."""

    def __init__(self, seed: int, name: str):
        # crc32 is stable across Python runs, unlike hash(str).
        self.generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
        self._buf: list[float] = []
        self._pos = 0

    def random(self) -> float:
        """A uniform double in [0, 1)."""
        if self._pos >= len(self._buf):
            self._buf = self.generator.random(_BLOCK).tolist()
            self._pos = 0
        value = self._buf[self._pos]
        self._pos += 1
        return value

    def below(self, n: int) -> int:
        """A uniform integer in ``0 .. n-1``."""
        return min(int(self.random() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:
        """A uniform integer in ``lo .. hi`` (inclusive)."""
        return lo + self.below(hi - lo + 1)

    def chance(self, p: float) -> bool:
        return self.random() < p

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def weighted(self, items: Sequence[T], weights: Sequence[float]) -> T:
        u = self.random() * sum(weights)
        acc = 0.0
        for item, w in zip(items, weights, strict=True):
            acc += w
            if u < acc:
                return item
        return items[-1]

    def shuffle(self, items: list[T]) -> list[T]:
        """Shuffle ``items`` in place (Fisher-Yates) and return it."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]
        return items

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        """``k`` distinct elements of ``seq`` in random order."""
        return self.shuffle(list(seq))[:k]
