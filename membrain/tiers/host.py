"""Host tier: packed KV blocks in HostPool slots inside each worker process.

The scheduler owns the policy through :class:`HostIndex` (block hashes with a fixed capacity in
blocks, ordered by the server's eviction policy); every worker mirrors it with a :class:`HostStore` that executes the
scheduler's plan (store, load, evict) on its own slots. The worker never decides on its own, so
both sides agree without a round trip; where they could still diverge (a slot shortage, a failed
gather) the worker's load of that block fails and is reported, which makes vLLM recompute it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from typing import cast

from membrain import HostPool, Slot, ops

logger = logging.getLogger("membrain.tiers.host")

# Prefaulting backs this many bytes of slots per native call (the GIL is free meanwhile).
PREFAULT_STEP_BYTES = 64 << 20


class HostIndex:
    """Scheduler-side index of the block hashes held by the workers' host tiers.

    Ordering and eviction are the server's own C++ policies (``membrain._native.PolicyIndex``
    over ``csrc/server/list_policy.*``, the code ``membrain bench policy`` measures), not a
    Python copy: ``policy`` is ``"slru"`` (default) or ``"lru"``, ``admission`` ``"all"`` or
    ``"seen"`` (a block is admitted on its second sight). A request's blocks are applied tail
    first, so a chain loses its tail before its head. ``priority`` (0..3) raises the retention of
    the blocks admitted or touched with it.

    Units are block hashes (bytes) or, for hybrid models, ``(group, hash)``; the C++ index takes
    bytes, so a ``(group, hash)`` unit is held as ``bytes([group]) + hash`` (one index never
    mixes the two forms: a scheduler is hybrid or not)."""

    def __init__(self, capacity_blocks: int, policy: str | None = None, admission: str = "all") -> None:
        from membrain import _native

        self.capacity = max(0, int(capacity_blocks))
        self.policy = policy or str(_native.DEFAULT_EVICTION_POLICY)
        self.admission = admission
        self._index = _native.PolicyIndex(self.policy, self.capacity, admission)
        self._grouped = False  # units are (group, hash)

    def _enc(self, units: Iterable[Hashable]) -> list[bytes]:
        out = []
        for u in units:
            if isinstance(u, tuple):
                self._grouped = True
                g, h = u
                out.append(bytes([int(g)]) + bytes(h))
            else:
                out.append(bytes(cast(bytes, u)))
        return out

    def _dec(self, keys: Iterable[bytes]) -> list[Hashable]:
        if not self._grouped:
            return list(keys)
        return [(k[0], bytes(k[1:])) for k in keys]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, h: Hashable) -> bool:
        return self._enc([h])[0] in self._index

    @property
    def evictions(self) -> dict[str, int]:
        """Evictions so far, by reason: first-sight (probation), re-used (protected), priority."""
        i = self._index
        return {
            "probation": i.evicted_probation,
            "protected": i.evicted_protected,
            "priority": i.evicted_priority,
        }

    def prefix_hits(self, hashes: Sequence[Hashable]) -> int:
        """How many leading ``hashes`` are held."""
        return int(self._index.prefix_hits(self._enc(hashes)))

    def touch(self, hashes: Iterable[Hashable]) -> None:
        self._index.touch(self._enc(hashes))

    def admit(
        self, hashes: Sequence[Hashable], protect: set[Hashable] | None = None, priority: int = 0
    ) -> tuple[list[Hashable], list[Hashable]]:
        """Adds new ``hashes`` (a prefix chain, head first); returns (admitted, evicted).

        Held ones are refreshed. Eviction follows the policy and never takes a hash of
        ``protect`` or one of ``hashes`` already held; new hashes that cannot get room are not
        admitted, the chain's tail first.
        """
        if self.capacity == 0:
            return [], []
        admitted, evicted = self._index.admit(self._enc(hashes), self._enc(protect or ()), int(priority))
        return self._dec(admitted), self._dec(evicted)

    def discard(self, hashes: Iterable[Hashable]) -> None:
        self._index.discard(self._enc(hashes))


class HostStore:
    """Worker-side holder of packed blocks: key -> Slot of one HostPool.

    The index is shared by the step thread (stores, evictions) and the background loader
    (shared references for loads, promotions): every change holds ``lock``. A slot handed out
    with :meth:`share` stays valid after its key is evicted until the holder releases it."""

    def __init__(self, slot_bytes: int, capacity_blocks: int, headroom: int, pin: bool) -> None:
        self.capacity = capacity_blocks
        n = max(1, capacity_blocks + headroom)
        # Transparent huge pages where the kernel allows: a first touch then costs one fault per
        # 2 MiB instead of per 4 KiB (measured: 496 x 1 MiB first writes at 1.1-1.2 GB/s on 4 KiB
        # pages, 2.2-3.1 GB/s on huge pages, 5.7-6.4 GB/s into memory already backed).
        self.pool = HostPool(slot_bytes, n, pin=pin, huge_pages=True)
        self._slots: dict[bytes, Slot] = {}
        self.lock = threading.RLock()
        self.prefaulted_bytes = 0

    def prefault(self) -> None:
        """Backs every slot with memory now, so loads and stores never take the first-touch
        page faults on their hot path. Called once at start-up, in the foreground: done in the
        background it overlapped the first loads and slowed them 3-6x on 2 cores (a 4 GiB tier
        takes 0.5-1.5 s). Contents are left alone. Pinned pools (CUDA) are already backed by the
        pinning; this is for pageable ones."""
        pool = self.pool
        if pool.pinned or self.prefaulted_bytes:
            return
        step = max(1, PREFAULT_STEP_BYTES // pool.slot_bytes)
        t0 = time.perf_counter()
        for first in range(0, pool.num_slots, step):
            done = pool.prefault(first, step)
            if done == 0:  # kernel without MADV_POPULATE_WRITE, or memory short: first touch it is
                logger.info(
                    "Membrain host tier: prefault stopped after %.1f MiB (the kernel cannot "
                    "populate ahead); the rest is backed as it fills",
                    self.prefaulted_bytes / 2**20,
                )
                return
            self.prefaulted_bytes += done
        logger.info(
            "Membrain host tier: %.1f MiB prefaulted in %.2f s (huge pages: %s)",
            self.prefaulted_bytes / 2**20,
            time.perf_counter() - t0,
            "yes" if pool.huge_pages else "no",
        )

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
