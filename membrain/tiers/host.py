"""Host tier: packed KV blocks in HostPool slots inside each worker process.

The scheduler owns the policy through :class:`HostIndex` (an LRU of block hashes with a fixed
capacity in blocks); every worker mirrors it with a :class:`HostStore` that executes the
scheduler's plan (store, load, evict) on its own slots. The worker never decides on its own, so
both sides agree without a round trip; where they could still diverge (a slot shortage, a failed
gather) the worker's load of that block fails and is reported, which makes vLLM recompute it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

from membrain import HostPool, Slot, ops


class HostIndex:
    """Scheduler-side LRU of block hashes held by the workers' host tiers."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(0, int(capacity_blocks))
        self._lru: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, h: Hashable) -> bool:
        return h in self._lru

    def prefix_hits(self, hashes: Sequence[Hashable]) -> int:
        """How many leading ``hashes`` are held."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def touch(self, hashes: Iterable[Hashable]) -> None:
        for h in hashes:
            if h in self._lru:
                self._lru.move_to_end(h)

    def admit(
        self, hashes: Sequence[Hashable], protect: set[Hashable] | None = None
    ) -> tuple[list[Hashable], list[Hashable]]:
        """Adds new ``hashes`` (most recent last); returns (admitted, evicted).

        Eviction takes least-recently-used entries not in ``protect``; a hash that cannot get room
        is not admitted.
        """
        admitted: list[Hashable] = []
        evicted: list[Hashable] = []
        if self.capacity == 0:
            return admitted, evicted
        protect = protect or set()
        for h in hashes:
            if h in self._lru:
                self._lru.move_to_end(h)
                continue
            while len(self._lru) >= self.capacity:
                victim = next((k for k in self._lru if k not in protect), None)
                if victim is None:
                    break
                del self._lru[victim]
                evicted.append(victim)
            if len(self._lru) >= self.capacity:
                break
            self._lru[h] = None
            admitted.append(h)
        return admitted, evicted

    def discard(self, hashes: Iterable[Hashable]) -> None:
        for h in hashes:
            self._lru.pop(h, None)


class HostStore:
    """Worker-side holder of packed blocks: key -> Slot of one HostPool.

    The index is shared by the step thread (stores, evictions) and the background loader
    (shared references for loads, promotions): every change holds ``lock``. A slot handed out
    with :meth:`share` stays valid after its key is evicted until the holder releases it."""

    def __init__(self, slot_bytes: int, capacity_blocks: int, headroom: int, pin: bool) -> None:
        self.capacity = capacity_blocks
        n = max(1, capacity_blocks + headroom)
        self.pool = HostPool(slot_bytes, n, pin=pin, huge_pages=False)
        self._slots: dict[bytes, Slot] = {}
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: bytes) -> bool:
        return key in self._slots

    def keys(self) -> list[bytes]:
        with self.lock:
            return list(self._slots)

    def get(self, key: bytes) -> Slot | None:
        with self.lock:
            return self._slots.get(key)

    def share(self, keys: Sequence[bytes]) -> list[Slot | None]:
        """A new reference to each held key's slot (None where not held); release each."""
        with self.lock:
            out: list[Slot | None] = []
            for k in keys:
                s = self._slots.get(k)
                out.append(s.share() if s is not None else None)
            return out

    def evict(self, keys: Iterable[bytes]) -> None:
        with self.lock:
            for k in keys:
                slot = self._slots.pop(k, None)
                if slot is not None:
                    slot.release()

    def acquire(self) -> Slot | None:
        return self.pool.acquire()

    def insert(self, key: bytes, slot: Slot) -> None:
        with self.lock:
            old = self._slots.pop(key, None)
            if old is not None:
                old.release()
            self._slots[key] = slot

    def insert_if_absent(self, key: bytes, slot: Slot) -> bool:
        """Holds ``slot`` for ``key`` unless the key is already held (then the caller keeps
        ``slot``); a held slot is never replaced from the loader thread, so a reference taken
        with :meth:`get` on the step thread stays valid."""
        with self.lock:
            if key in self._slots:
                return False
            self._slots[key] = slot
            return True

    def store(
        self, kv: ops.PagedKV | Sequence[ops.PagedKV], block_ids: Sequence[int], keys: Sequence[bytes]
    ) -> list[Slot | None]:
        """Gathers each block into its own slot (synchronously); returns the slots (None where
        no slot was free). ``kv`` may be one description per block (its KV-cache group's)."""
        out: list[Slot | None] = []
        kvs = [kv] * len(block_ids) if isinstance(kv, ops.PagedKV) else list(kv)
        for b, k, one in zip(block_ids, keys, kvs):
            slot = self.get(k)
            if slot is None:
                slot = self.pool.acquire()
                if slot is None:
                    out.append(None)
                    continue
                ops.gather_blocks(one, [b], slot)
                self.insert(k, slot)
            out.append(slot)
        return out

    def load(self, kv: ops.PagedKV, block_ids: Sequence[int], keys: Sequence[bytes]) -> list[bool]:
        """Scatters held blocks into ``block_ids``; False where the key is not held."""
        ok: list[bool] = []
        for b, slot in zip(block_ids, self.share(keys)):
            if slot is None:
                ok.append(False)
                continue
            try:
                ops.scatter_blocks(slot, kv, [b])
            finally:
                slot.release()
            ok.append(True)
        return ok

    def close(self) -> None:
        self.evict(self.keys())
