"""Worker-side execution of the scheduler's tier plans: the data movement of loads and stores.

The scheduler (:class:`~membrain.tiers.manager.TierManager`) decides which blocks come from or go
to which tier; every worker runs the same :class:`LoadPlan` / :class:`StorePlan` on its own KV
cache through a :class:`TierExecutor`, which owns the host store (pinned slots) and the remote
tier. Every block a plan asked for either lands or is returned as failed, so the caller can
report it to vLLM, which recomputes it: no outcome is silent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from membrain import ops
from membrain.tiers.host import HostStore
from membrain.tiers.manager import LoadPlan, StorePlan
from membrain.tiers.remote import RemoteTier

logger = logging.getLogger("membrain.tiers.executor")

# Slots kept beyond the host tier's capacity for staging remote transfers.
HOST_HEADROOM_BLOCKS = 64


@dataclass
class LoadResult:
    failed_block_ids: list[int]
    host_blocks: int = 0  # loaded from the host tier
    remote_blocks: int = 0  # loaded from the remote tier


@dataclass
class StoreResult:
    host_blocks: int = 0  # now held by the host tier
    remote_blocks: int = 0  # shipped to the remote tier (asynchronously)
    dropped_blocks: int = 0  # not shipped (back-pressure, no slot, remote down)


class TierExecutor:
    """Runs load and store plans for one worker's KV cache (``kv``, described by
    :func:`membrain.ops.describe_kv_caches`). ``sync`` waits for the device work queued by
    gathers/scatters (a CUDA stream synchronize; a no-op on CPU, where they are synchronous)."""

    def __init__(
        self,
        kv: ops.PagedKV,
        remote: RemoteTier | None,
        max_inflight: int,
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        self.kv = kv
        self.remote = remote
        self.max_inflight = max_inflight
        self.sync = sync
        self.store_: HostStore | None = None
        self.block_bytes = kv.packed_nbytes(1)

    def host(self, capacity_blocks: int) -> HostStore | None:
        """The host tier's slots (``capacity_blocks`` from the scheduler) plus staging headroom
        for remote transfers; created on first use, also with capacity 0 when remote is on."""
        if self.store_ is None and (capacity_blocks > 0 or self.remote is not None):
            headroom = HOST_HEADROOM_BLOCKS
            if self.remote is not None:
                headroom = max(headroom, min(self.max_inflight, 4 * HOST_HEADROOM_BLOCKS))
            self.store_ = HostStore(
                self.block_bytes, capacity_blocks, headroom, pin=self.kv.device_type == "cuda"
            )
        return self.store_

    # ---------------------------------------------------------------- loads

    def load(self, plan: LoadPlan, keys: Sequence[bytes], host_capacity: int) -> LoadResult:
        """Loads every block of ``plan`` (host tier first, then one batched remote fetch into
        slots, scattered into the device blocks); promotes remote blocks the plan marks."""
        store = self.host(host_capacity)
        failed: list[int] = []
        host_idx = [i for i, r in enumerate(plan.from_remote) if not r]
        rem_idx = [i for i, r in enumerate(plan.from_remote) if r]
        host_ok = 0
        if host_idx:
            oks = (
                store.load(self.kv, [plan.block_ids[i] for i in host_idx], [keys[i] for i in host_idx])
                if store is not None
                else [False] * len(host_idx)
            )
            host_ok = sum(oks)
            failed += [plan.block_ids[i] for i, ok in zip(host_idx, oks) if not ok]
        remote_ok = 0
        if rem_idx:
            remote_ok = self._load_remote(plan, keys, rem_idx, store, failed)
        return LoadResult(failed, host_ok, remote_ok)

    def _load_remote(
        self,
        plan: LoadPlan,
        keys: Sequence[bytes],
        rem_idx: list[int],
        store: HostStore | None,
        failed: list[int],
    ) -> int:
        # Fetch into pool slots (pinned on CUDA); pageable scratch only on CPU.
        bufs: list[Any] = []
        for _ in rem_idx:
            slot: Any = store.acquire() if store is not None else None
            if slot is None and self.kv.device_type == "cpu":
                slot = bytearray(self.block_bytes)
            bufs.append(slot)
        want = [j for j, b in enumerate(bufs) if b is not None]
        got = (
            self.remote.get_into([keys[rem_idx[j]] for j in want], [bufs[j] for j in want])
            if self.remote is not None
            else [False] * len(want)
        )
        oks = [False] * len(rem_idx)
        for j, ok in zip(want, got):
            oks[j] = ok
        keep: list[tuple[bytes, Any]] = []
        n_ok = 0
        for i, buf, ok in zip(rem_idx, bufs, oks):
            if ok:
                ops.scatter_blocks(buf, self.kv, [plan.block_ids[i]])
                n_ok += 1
            else:
                failed.append(plan.block_ids[i])
            if buf is not None and not isinstance(buf, bytearray):
                keep.append((keys[i], buf) if ok and plan.promote[i] else (b"", buf))
        self.sync()  # scatters done before any slot is reused or released
        for k, buf in keep:
            if k and store is not None:
                store.insert(k, buf)  # promotion into the host tier
            else:
                buf.release()
        return n_ok

    # ---------------------------------------------------------------- stores

    def store(
        self,
        plan: StorePlan,
        keys: Sequence[bytes],
        host_capacity: int,
        on_remote_done: Callable[[int, int], None] | None = None,
    ) -> StoreResult:
        """Gathers the plan's blocks into host slots (the host tier keeps those the plan admits)
        and ships the remote ones without waiting; ``on_remote_done(stored, failed)`` runs when
        the remote put completes. After this returns the device blocks are no longer read."""
        store = self.host(host_capacity)
        host_slots: list[Any] = [None] * len(keys)
        hi = [i for i, f in enumerate(plan.to_host) if f]
        if hi and store is not None:
            got = store.store(self.kv, [plan.block_ids[i] for i in hi], [keys[i] for i in hi])
            for i, s in zip(hi, got):
                host_slots[i] = s
        res = StoreResult(host_blocks=sum(1 for i in hi if host_slots[i] is not None))
        to_remote = [i for i, f in enumerate(plan.to_remote) if f]
        if not to_remote:
            self.sync()
            return res
        if self.remote is None or not self.remote.available:
            self.sync()
            res.dropped_blocks = len(to_remote)
            return res
        rk: list[bytes] = []
        rv: list[memoryview] = []
        handles: list[Any] = []
        for i in to_remote:
            s = store.get(keys[i]) if store is not None else None
            h: Any
            if s is not None:
                h = s.share()
            else:
                h = store.acquire() if store is not None else None
                if h is None:
                    res.dropped_blocks += 1
                    continue
                ops.gather_blocks(self.kv, [plan.block_ids[i]], h)
            rk.append(keys[i])
            rv.append(memoryview(h))
            handles.append(h)
        self.sync()  # gathers complete before the bytes are shipped (CUDA)
        if not rk:
            return res

        def done(results: list[bool]) -> None:
            for h in handles:
                h.release()
            ok = sum(1 for r in results if r)
            if on_remote_done is not None:
                on_remote_done(ok, len(results) - ok)

        if self.remote.put_async(rk, rv, done):
            res.remote_blocks = len(rk)
        else:
            res.dropped_blocks += len(rk)
            for h in handles:
                h.release()
        return res

    def evict_host(self, keys: Sequence[bytes]) -> None:
        if self.store_ is not None and keys:
            self.store_.evict(keys)

    def clear_host(self) -> None:
        """Drops every block of the host tier (``reset_cache``)."""
        if self.store_ is not None:
            self.store_.evict(list(self.store_.keys()))
