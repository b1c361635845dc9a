"""Rendezvous (highest-random-weight) hashing of keys onto endpoints.

Each (key, endpoint) pair gets a pseudo-random score; a key lives on the R endpoints with the
highest scores. Adding or removing one server moves only the keys it gains or loses, and
every client computes the same placement with no coordination.
"""

from __future__ import annotations

from collections.abc import Sequence

from membrain import _native


class Rendezvous:
    """Ranks endpoints per key. Endpoint identity is its string form, so every client with the
    same endpoint list (in any order) agrees on placement."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("rendezvous hashing needs at least one endpoint")
        # One XXH3 seed per endpoint: score(key, ep) = xxh3(key, seed_ep).
        self._seeds = [_native.checksum64(name.encode()) for name in names]

    def __len__(self) -> int:
        return len(self._seeds)

    def ranked(self, key: bytes) -> list[int]:
        """Endpoint indices, best owner first."""
        if len(self._seeds) == 1:
            return [0]
        scores = [(_native.checksum64(key, seed), i) for i, seed in enumerate(self._seeds)]
        scores.sort(reverse=True)
        return [i for _, i in scores]

    def owners(self, key: bytes, replicas: int) -> list[int]:
        """The ``replicas`` distinct endpoints that store ``key``, best first."""
        return self.ranked(key)[:replicas]
