"""Scheduler-side tier policy: where a request's missing prefix blocks come from, what to store,
and what the host tier evicts. Works on vLLM block hashes; keys are made by the caller's
``key_of`` (rank-0 identity) for the remote lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from membrain.tiers.host import HostIndex
from membrain.tiers.remote import RemoteTier


@dataclass(frozen=True)
class Match:
    """Block ranges, counted from block 0: ``[local, host_end)`` from the host tier and
    ``[host_end, remote_end)`` from the remote tier."""

    local: int
    host_end: int
    remote_end: int

    @property
    def host_blocks(self) -> int:
        return self.host_end - self.local

    @property
    def remote_blocks(self) -> int:
        return self.remote_end - self.host_end


@dataclass
class LoadPlan:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    from_remote: list[bool] = field(default_factory=list)
    promote: list[bool] = field(default_factory=list)


@dataclass
class StorePlan:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    to_host: list[bool] = field(default_factory=list)
    to_remote: list[bool] = field(default_factory=list)


class TierManager:
    def __init__(
        self,
        host_capacity_blocks: int,
        remote: RemoteTier | None,
        key_of: Callable[[bytes], bytes],
        policy: str | None = None,
        admission: str = "all",
    ) -> None:
        self.host = HostIndex(host_capacity_blocks, policy, admission)
        self.remote = remote
        self.key_of = key_of
        self._pending_evict: dict[bytes, None] = {}
        self._lookups: ThreadPoolExecutor | None = None

    def host_end(self, hashes: Sequence[bytes], local_blocks: int, max_blocks: int) -> int:
        """Where the host tier's run of blocks after ``local_blocks`` ends (at most
        ``max_blocks``); immediate (scheduler memory only)."""
        max_blocks = min(max_blocks, len(hashes))
        if max_blocks <= local_blocks:
            return local_blocks
        return local_blocks + self.host.prefix_hits(hashes[local_blocks:max_blocks])

    def needs_remote(self, host_end: int, max_blocks: int) -> bool:
        """Whether the remote tier must be asked beyond ``host_end`` (it is on, reachable --
        an open breaker answers "miss" at once -- and the host tier did not cover it all)."""
        return self.remote is not None and host_end < max_blocks and self.remote.available

    def lookup_async(self, hashes: Sequence[bytes], start: int, end: int) -> Future[int]:
        """Starts the remote lookup of blocks ``[start, end)`` on a small background pool;
        the future's result is how many of them, from ``start`` on, the remote tier holds
        (never raises: a failed lookup is 0)."""
        assert self.remote is not None
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="membrain-lookup")
        keys = [self.key_of(h) for h in hashes[start:end]]
        remote = self.remote
        return self._lookups.submit(remote.lookup_prefix, keys)

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)

    def match(self, hashes: Sequence[bytes], local_blocks: int, max_blocks: int) -> Match:
        """Looks beyond vLLM's own hit: host first, then one batched remote round trip."""
        max_blocks = min(max_blocks, len(hashes))
        if max_blocks <= local_blocks:
            return Match(local_blocks, local_blocks, local_blocks)
        host_end = local_blocks + self.host.prefix_hits(hashes[local_blocks:max_blocks])
        remote_end = host_end
        if self.remote is not None and host_end < max_blocks:
            keys = [self.key_of(h) for h in hashes[host_end:max_blocks]]
            remote_end = host_end + self.remote.lookup_prefix(keys)
        return Match(local_blocks, host_end, remote_end)

    def _admit(
        self, hashes: Sequence[bytes], protect: set[bytes] | None = None, priority: int = 0
    ) -> set[bytes]:
        admitted, evicted = self.host.admit(hashes, protect, priority)
        for h in admitted:
            self._pending_evict.pop(h, None)
        for h in evicted:
            self._pending_evict[h] = None
        return set(admitted)

    def plan_load(
        self, m: Match, hashes: Sequence[bytes], block_ids: Sequence[int], priority: int = 0
    ) -> LoadPlan:
        """``block_ids[i]`` is the device block of block position ``i`` of the request;
        ``priority`` (0..3) is the request's retention priority for its prefix."""
        plan = LoadPlan()
        host_h = list(hashes[m.local : m.host_end])
        remote_h = list(hashes[m.host_end : m.remote_end])
        # One chain, applied tail first: the host blocks are refreshed and the remote ones
        # promoted without either half evicting the other.
        promoted = self._admit(host_h + remote_h, protect=set(host_h), priority=priority)
        for i in range(m.local, m.remote_end):
            h = hashes[i]
            r = i >= m.host_end
            plan.block_ids.append(int(block_ids[i]))
            plan.hashes.append(h)
            plan.from_remote.append(r)
            plan.promote.append(r and h in promoted)
        return plan

    def plan_store(self, hashes: Sequence[bytes], block_ids: Sequence[int], priority: int = 0) -> StorePlan:
        admitted = self._admit(hashes, priority=priority)
        remote = self.remote is not None
        return StorePlan(
            list(map(int, block_ids)), list(hashes), [h in admitted for h in hashes], [remote] * len(hashes)
        )

    def reset(self) -> None:
        """Forgets every block of the host tier (the workers drop theirs on the same step)."""
        self.host = HostIndex(self.host.capacity, self.host.policy, self.host.admission)
        self._pending_evict.clear()

    def take_evictions(self) -> list[bytes]:
        out = list(self._pending_evict)
        self._pending_evict.clear()
        return out
