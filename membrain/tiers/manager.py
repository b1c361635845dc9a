"""Scheduler-side tier policy: where a request's missing prefix blocks come from, what to store,
and what the host tier evicts. Works on vLLM block hashes; keys are made by the caller's
``key_of`` (rank-0 identity) for the remote lookup.

A *unit* is what one key names: with one KV-cache group a unit is a block and its id is the
block's hash; with several groups (vLLM's hybrid KV-cache manager) a unit is one block of one
group and its id is ``(group, hash)``. Plans list units; ``groups`` and ``positions`` say, per
unit, its KV-cache group and its block position in the request (empty: group 0, one unit per
position). The hybrid hit rule (full-attention groups need the whole prefix, sliding-window
groups only the window before the hit end) is :func:`hybrid_hit_end`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

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
    hashes: list[Any] = field(default_factory=list)  # unit ids (see the module docstring)
    from_remote: list[bool] = field(default_factory=list)
    promote: list[bool] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)  # KV-cache group per unit (empty: all 0)
    positions: list[int] = field(default_factory=list)  # block position per unit (empty: one each)


@dataclass
class StorePlan:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[Any] = field(default_factory=list)
    to_host: list[bool] = field(default_factory=list)
    to_remote: list[bool] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


def plan_tokens(positions: Sequence[int], units: Collection[int], block_size: int) -> int:
    """Tokens covered by the plan's units ``units`` (indices): each block position once, however
    many KV-cache groups it has units in (``positions`` empty: one unit per position)."""
    if not positions:
        return len(units) * block_size
    return len({positions[i] for i in units}) * block_size


@dataclass(frozen=True)
class Unit:
    """One (group, block position) a hybrid hit needs: its id and the device block it goes to."""

    group: int
    position: int
    uid: Any
    block_id: int = -1


def hybrid_hit_end(
    local: int,
    max_blocks: int,
    full_groups: Sequence[int],
    window_groups: Sequence[tuple[int, int]],
    uid: Callable[[int, int], Any],
    held: Callable[[list[Any]], int],
    max_rounds: int = 4,
) -> int:
    """The longest hit end ``E`` (in blocks, ``local <= E <= max_blocks``) that vLLM's own
    hybrid prefix cache would accept (``HybridKVCacheCoordinator.find_longest_cache_hit``):
    every full-attention group holds blocks ``[local, E)`` and every sliding-window group
    ``(group, window_blocks)`` the blocks ``[max(local, E - window_blocks), E)`` (the window
    that ends at ``E``; ``SlidingWindowManager``'s ``cdiv(window - 1, block_size)``
    contiguous blocks; blocks below ``local`` are vLLM's own hit). ``held(uids)`` says how many
    leading units are available. A sliding-window group missing block ``p`` moves the candidate
    to ``E = p`` (no window containing ``p`` can serve), for at most ``max_rounds`` rounds
    (each may be a remote round trip), then the hit is ``local`` (no hit)."""
    if max_blocks <= local:
        return local
    end = max_blocks
    if full_groups:
        ids = [uid(g, i) for i in range(local, max_blocks) for g in full_groups]
        end = local + held(ids) // len(full_groups)
    for _ in range(max_rounds):
        if end <= local:
            return local
        new_end = end
        for g, window in window_groups:
            start = max(local, end - window)
            ids = [uid(g, i) for i in range(end - 1, start - 1, -1)]  # backwards from the end
            n = held(ids)
            if n < len(ids):
                new_end = min(new_end, end - 1 - n)  # block end-1-n is missing
        if new_end == end:
            return end
        end = new_end
    return local


def _held_in(ids: set[Any]) -> Callable[[list[Any]], int]:
    """How many of a run of unit ids, from its start, are in ``ids``."""

    def held(run: list[Any]) -> int:
        n = 0
        while n < len(run) and run[n] in ids:
            n += 1
        return n

    return held


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
        self._pending_evict: dict[Any, None] = {}
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

    def _host_ids(
        self,
        local: int,
        max_blocks: int,
        full_groups: Sequence[int],
        window_groups: Sequence[tuple[int, int]],
        uid: Callable[[int, int], Any],
    ) -> set[Any]:
        return {
            u
            for g in [*full_groups, *(w[0] for w in window_groups)]
            for i in range(local, max_blocks)
            if (u := uid(g, i)) in self.host
        }

    def hybrid_host_end(
        self,
        local: int,
        max_blocks: int,
        full_groups: Sequence[int],
        window_groups: Sequence[tuple[int, int]],
        uid: Callable[[int, int], Any],
    ) -> int:
        """The hybrid hit end (:func:`hybrid_hit_end`) over the host tier alone, now."""
        host_ids = self._host_ids(local, max_blocks, full_groups, window_groups, uid)
        return hybrid_hit_end(local, max_blocks, full_groups, window_groups, uid, _held_in(host_ids))

    def hybrid_lookup(
        self,
        local: int,
        max_blocks: int,
        full_groups: Sequence[int],
        window_groups: Sequence[tuple[int, int]],
        uid: Callable[[int, int], Any],
    ) -> tuple[int, Future[int] | None]:
        """The hybrid hit end (:func:`hybrid_hit_end`) from the host tier alone (immediate),
        and, when the remote tier must be asked beyond it, a future of the end over both tiers
        (computed on the lookup pool from a snapshot of the host index: never on the engine's
        thread). A unit the host tier loses meanwhile is loaded from the remote tier or fails
        as a load error, so a stale answer costs a recompute, never wrong bytes."""
        host_ids = self._host_ids(local, max_blocks, full_groups, window_groups, uid)
        host_end = hybrid_hit_end(local, max_blocks, full_groups, window_groups, uid, _held_in(host_ids))
        if not self.needs_remote(host_end, max_blocks):
            return host_end, None
        remote = self.remote
        assert remote is not None
        key_of = self.key_of

        def held(ids: list[Any]) -> int:
            n = 0
            while n < len(ids):
                if ids[n] in host_ids:
                    n += 1
                    continue
                j = n
                while j < len(ids) and ids[j] not in host_ids:
                    j += 1
                got = remote.lookup_prefix([key_of(u) for u in ids[n:j]])
                n += got
                if n < j:
                    break
            return n

        def run() -> int:
            return hybrid_hit_end(local, max_blocks, full_groups, window_groups, uid, held)

        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="membrain-lookup")
        return host_end, self._lookups.submit(run)

    def plan_load_units(self, units: Sequence[Unit], priority: int = 0) -> tuple[LoadPlan, set[int]]:
        """A load plan for ``units`` (hybrid models): each from the host tier when it holds it,
        else from the remote tier (promoted into the host tier where it gets room, with the
        request's retention ``priority``). Returns the plan and the block positions that need
        the remote tier."""
        plan = LoadPlan()
        host_u = [u.uid for u in units if u.uid in self.host]
        self.host.touch(host_u)
        held = set(host_u)
        remote_u = [u.uid for u in units if u.uid not in held]
        promoted = (
            self._admit(remote_u, protect=held | set(remote_u), priority=priority) if remote_u else set()
        )
        remote_pos: set[int] = set()
        for u in units:
            r = u.uid not in held
            plan.block_ids.append(int(u.block_id))
            plan.hashes.append(u.uid)
            plan.from_remote.append(r)
            plan.promote.append(r and u.uid in promoted)
            plan.groups.append(u.group)
            plan.positions.append(u.position)
            if r:
                remote_pos.add(u.position)
        return plan, remote_pos

    def plan_store_units(self, units: Sequence[Unit], priority: int = 0) -> StorePlan:
        plan = self.plan_store([u.uid for u in units], [u.block_id for u in units], priority)
        plan.groups = [u.group for u in units]
        plan.positions = [u.position for u in units]
        return plan

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

    def _admit(self, hashes: Sequence[Any], protect: set[Any] | None = None, priority: int = 0) -> set[Any]:
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

    def plan_store(self, hashes: Sequence[Any], block_ids: Sequence[int], priority: int = 0) -> StorePlan:
        admitted = self._admit(hashes, priority=priority)
        remote = self.remote is not None
        return StorePlan(
            list(map(int, block_ids)), list(hashes), [h in admitted for h in hashes], [remote] * len(hashes)
        )

    def reset(self) -> None:
        """Forgets every block of the host tier (the workers drop theirs on the same step)."""
        self.host = HostIndex(self.host.capacity, self.host.policy, self.host.admission)
        self._pending_evict.clear()

    def take_evictions(self) -> list[Any]:
        out = list(self._pending_evict)
        self._pending_evict.clear()
        return out
