"""Scheduler side of the Membrain connector (engine-core process): matching, planning and
per-request state.

:class:`~membrain.tiers.manager.TierManager` decides what each waiting request loads from the
host and remote tiers and which newly computed full prompt blocks are stored; the plans travel
to every worker in :class:`~membrain.vllm.metadata.MembrainMetadata`. The scheduler validates at
start-up, with the same function the workers use, that the KV cache vLLM will hand the workers
can be moved; where it cannot, it never promises a token.

Hybrid models (several KV-cache groups under vLLM's hybrid KV-cache manager, or a sliding-window
group): every group has its own key space (:func:`membrain.vllm.keys.group_identity`) and a
plan's unit is one block of one group. Hits follow vLLM's own hybrid prefix cache
(:func:`membrain.tiers.manager.hybrid_hit_end`): full-attention groups need every block of the
prefix, sliding-window groups only the window that ends at the hit -- the blocks vLLM allocates
for external tokens (it gives null blocks below the window, which are never loaded). Stores
take every full-attention block and the sliding-window blocks vLLM's own cache would keep
reachable (``SlidingWindowManager.reachable_block_mask``: all of them by default, only the
segment tails and the prompt's replay boundary with ``prefix_cache_retention_interval``), each
read in the step that computed it, before vLLM can free it once the window has passed.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from membrain import tracing
from membrain.tiers.manager import LoadPlan, Match, TierManager, Unit
from membrain.tiers.remote import RemoteTier
from membrain.vllm import keys as mkeys
from membrain.vllm import kv_format, parallel
from membrain.vllm.config import ConfigError, MembrainSettings, parse_priority
from membrain.vllm.events import EventLog
from membrain.vllm.metadata import MembrainMetadata
from membrain.vllm.stats import FailureCounter, MembrainStats, StatsRecorder

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.membrain")


def _scheduled_tokens(scheduler_output: SchedulerOutput) -> int:
    total = getattr(scheduler_output, "total_num_scheduled_tokens", None)
    if total is None:
        total = sum(getattr(scheduler_output, "num_scheduled_tokens", {}).values())
    return int(total)


@dataclass
class _ReqState:
    request: Any
    stored_upto: int = -1  # block index up to which prompt blocks are stored or skipped
    # The answer of the last lookup, kept per request until vLLM allocates (vLLM may ask again
    # every step while the request waits); dropped when the request's cached prefix moves.
    match: Match | None = None
    match_key: tuple[int, int] = (-1, -1)
    host_tokens: int = 0  # external tokens planned from the host tier
    remote_tokens: int = 0  # ... and from the remote tier
    # Remote lookups run in the background: the one in flight (and the block it starts at),
    # then its answer as the block range [start, end) the remote tier holds.
    lookup: Future[int] | None = None
    lookup_started: float = 0.0  # time.monotonic() when it was started
    lookup_from: int = -1
    lookup_key: tuple[int, int] = (-1, -1)  # hybrid: the (local, max_blocks) it answers
    remote_known: tuple[int, int] | None = None


class MembrainScheduler:
    def __init__(
        self,
        vllm_config: Any,
        kv_cache_config: Any,
        settings: MembrainSettings,
        remote: RemoteTier | None,
        kv_cache_manager: Any = None,
    ) -> None:
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.settings = settings
        self.block_size = int(vllm_config.cache_config.block_size)
        self.kv_cache_manager = kv_cache_manager
        self.enabled = True
        problem = kv_format.unsupported_reason(vllm_config, kv_cache_config)
        if not problem:
            problem = kv_format.unsupported_groups(kv_cache_config, self.block_size)
        if problem:
            # The workers would refuse these tensors: promise nothing (vLLM computes everything).
            logger.error("Membrain disabled: %s", problem)
            self.enabled = False
        # Host tier per worker: its own shard of its own PP stage's layers (the largest stage's).
        self.block_bytes = parallel.host_block_bytes(vllm_config, kv_cache_config) if self.enabled else 0
        self.host_capacity = parallel.host_capacity_blocks(settings.cpu_cache_bytes, self.block_bytes)
        self.hash_ratio = 1
        if self.enabled:
            self.hash_ratio = self._hash_ratio()
        self.remote = remote if self.enabled else None
        kinds = kv_format.group_kinds(kv_cache_config) if self.enabled else []
        self.num_groups = len(kinds)
        self._full = [g for g, k in enumerate(kinds) if k.kind == kv_format.FULL]
        self._windows = [(g, k.window_blocks) for g, k in enumerate(kinds) if k.kind == kv_format.SLIDING]
        # The hybrid path: several groups, or a sliding window (whose blocks below the window
        # vLLM never allocates). One full-attention group keeps the single-chain path.
        self.hybrid = self.num_groups > 1 or bool(self._windows)
        self.epoch = "0"
        self._fields = mkeys.identity_fields(vllm_config, kv_cache_config, 0, 0)
        self.identity = mkeys.identity_digest(self._fields, self.epoch)
        self._group_ids = self._identities()
        self.tiers = TierManager(
            self.host_capacity, self.remote, self._key, settings.eviction_policy, settings.admission
        )
        self._reqs: dict[str, _ReqState] = {}
        self._stats = StatsRecorder()
        self._host_evicted = {"probation": 0, "protected": 0, "priority": 0}
        self._pending_loads: dict[str, LoadPlan] = {}
        self._failures = FailureCounter(self._stats)
        self._over_budget_count = 0  # lookups over budget since the last warning
        self._over_budget_logged = -1e9
        self._clear_host = False
        self._events = EventLog(vllm_config, self.block_size)
        if self.enabled:
            logger.info(
                "Membrain scheduler: host tier %d blocks (%.1f MiB), remote %s, identity %s",
                self.host_capacity,
                settings.cpu_cache_bytes / 2**20,
                ",".join(settings.endpoints) if self.remote else "off",
                self.identity,
            )
            if self.hybrid:
                logger.info(
                    "Membrain hybrid KV cache: %d KV-cache groups (%s); one key space per group",
                    self.num_groups,
                    ", ".join(
                        f"{g}: full attention"
                        if k.kind == kv_format.FULL
                        else f"{g}: sliding window {k.window_blocks} blocks"
                        for g, k in enumerate(kinds)
                    ),
                )

    def _hash_ratio(self) -> int:
        """request.block_hashes are per *hash* block; a KV block's key must be the chained hash
        that ends at that KV block's last token."""
        try:
            from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

            sched_bs, hash_bs = resolve_kv_cache_block_sizes(self.kv_cache_config, self.vllm_config)
        except Exception:
            sched_bs, hash_bs = self.block_size, self.block_size
        if sched_bs != self.block_size or hash_bs <= 0 or self.block_size % hash_bs:
            logger.error(
                "Membrain disabled: block size %s / hash block size %s unsupported", sched_bs, hash_bs
            )
            self.enabled = False
            return 1
        return int(self.block_size // hash_bs)

    def _identities(self) -> list[str]:
        return [mkeys.group_identity(self._fields, self.epoch, g) for g in range(max(1, self.num_groups))]

    def _key(self, uid: Any) -> bytes:
        """The key of a unit: a block hash (one KV-cache group) or ``(group, hash)``."""
        if isinstance(uid, tuple):
            return mkeys.block_key(self._group_ids[uid[0]], uid[1])
        return mkeys.block_key(self._group_ids[0], uid)

    def _uid_fn(self, hashes: list[bytes]) -> Any:
        """Unit ids of a request: ``(group, hash)`` with several groups, else the hash."""
        if self.num_groups > 1:
            return lambda g, i: (g, hashes[i])
        return lambda g, i: hashes[i]

    def _hashes(self, request: Request, n_blocks: int) -> list[bytes]:
        hs = list(request.block_hashes)
        r = self.hash_ratio
        if r > 1:
            hs = hs[r - 1 :: r]  # the hash ending at each KV block's last token
        return [bytes(h) for h in hs[:n_blocks]]

    def _priority(self, request: Request) -> int:
        """The request's retention priority: ``kv_transfer_params["membrain_priority"]`` (0..3)
        or the configured default; an unusable value is logged and ignored."""
        params = getattr(request, "kv_transfer_params", None) or {}
        value = params.get("membrain_priority") if isinstance(params, dict) else None
        if value is None:
            return self.settings.priority
        try:
            return parse_priority(value, "membrain_priority")
        except ConfigError as e:
            logger.warning(
                "Membrain: request %s: %s; using %d", request.request_id, e, self.settings.priority
            )
            return self.settings.priority

    def _state(self, request: Request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request)
        return st

    # ---------------------------------------------------------------- matching

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """vLLM's question "how many more prompt tokens can you load?", answered without
        waiting on the network: host-tier and no-remote answers are immediate; when the remote
        tier must be asked the lookup runs in the background and the answer is ``None`` ("ask
        again next step") until it is in. A positive answer is always an asynchronous load
        (the request waits in WAITING_FOR_REMOTE_KVS until the workers report it)."""
        if not self.enabled:
            return 0, False
        bs = self.block_size
        local = num_computed_tokens // bs
        max_blocks = (request.num_tokens - 1) // bs  # always leave the last token to compute
        st = self._state(request)
        key = (local, max_blocks)
        # vLLM may ask again every step while the request waits: the answer is kept per request
        # until it is allocated or its cached prefix changes, not re-asked over the network.
        if st.match is None or st.match_key != key:
            hashes = self._hashes(request, max_blocks)
            m = self._match(st, hashes, local)
            if m is None:
                return None, False
            headers = getattr(request, "trace_headers", None)
            with tracing.lookup_span(request.request_id, len(hashes), trace_headers=headers) as span:
                span.set(local_blocks=m.local, host_blocks=m.host_blocks, remote_blocks=m.remote_blocks)
            st.match, st.match_key = m, key
        ext = max(0, (st.match.remote_end - local) * bs)
        return ext, ext > 0

    def _match(self, st: _ReqState, hashes: list[bytes], local: int) -> Match | None:
        """The request's match, or None while the remote lookup it needs is in flight."""
        if self.hybrid:
            return self._match_hybrid(st, hashes, local)
        max_blocks = len(hashes)
        host_end = self.tiers.host_end(hashes, local, max_blocks)
        if not self.tiers.needs_remote(host_end, max_blocks):
            return Match(local, max(local, host_end), max(local, host_end))
        if st.remote_known is None and st.lookup is not None and st.lookup.done():
            try:
                n = int(st.lookup.result())
            except Exception:  # RemoteTier never raises; a cancelled future is a miss
                n = 0
            st.remote_known, st.lookup = (st.lookup_from, st.lookup_from + n), None
        elif st.remote_known is None and st.lookup is not None and self._over_budget(st):
            st.lookup.cancel()  # its answer is dropped; one still queued never reaches the server
            st.remote_known, st.lookup = (st.lookup_from, st.lookup_from), None
        known = st.remote_known
        if known is not None and known[0] <= host_end:
            # The remote holds [start, end) contiguously, so it also holds [host_end, end).
            return Match(local, host_end, max(host_end, min(known[1], max_blocks)))
        if known is not None:
            st.remote_known = None  # the host tier lost blocks meanwhile: a gap to ask about
        if st.lookup is None:
            st.lookup_from = host_end
            st.lookup = self.tiers.lookup_async(hashes, host_end, max_blocks)
            st.lookup_started = time.monotonic()
        return None

    def _over_budget(self, st: _ReqState) -> bool:
        """True when the request's lookup, still out, has had its ``lookup_budget_ms``: the
        request is then admitted without the remote tier's blocks (a hung or overloaded server
        costs it the budget, rounded up to the engine step in which vLLM asks again, not the
        call's deadline). Counted and logged."""
        waited = time.monotonic() - st.lookup_started
        if waited * 1e3 < self.settings.lookup_budget_ms:
            return False
        self._stats.add(lookups_over_budget=1)
        self._over_budget_count += 1
        now = time.monotonic()
        if now - self._over_budget_logged >= 30.0:
            logger.warning(
                "Membrain: %d remote lookup(s) still unanswered after lookup_budget_ms=%d (req %s); "
                "admitted without the remote tier's blocks. Check the Membrain servers "
                "(vllm:membrain_lookups_over_budget counts these)",
                self._over_budget_count,
                self.settings.lookup_budget_ms,
                st.request.request_id,
            )
            self._over_budget_logged, self._over_budget_count = now, 0
        return True

    def _match_hybrid(self, st: _ReqState, hashes: list[bytes], local: int) -> Match | None:
        """Hybrid models: the hit end over all groups (``Match(local, end, end)``: which units
        come from which tier is decided when the load is planned), or None while the remote
        lookup runs in the background."""
        key = (local, len(hashes))
        if st.lookup is not None and st.lookup_key == key:
            if not st.lookup.done():
                if not self._over_budget(st):
                    return None
                st.lookup.cancel()  # its answer is dropped; one still queued never reaches the server
                st.lookup = None
                # The host tier as it is now: a unit it lost during the budget is not planned
                # as a remote load from the server that did not answer.
                end = self.tiers.hybrid_host_end(
                    local, len(hashes), self._full, self._windows, self._uid_fn(hashes)
                )
                return Match(local, end, end)
            try:
                end = int(st.lookup.result())
            except Exception:  # RemoteTier never raises; a cancelled future is a miss
                end = local
            st.lookup = None
            return Match(local, end, end)
        end, fut = self.tiers.hybrid_lookup(
            local, len(hashes), self._full, self._windows, self._uid_fn(hashes)
        )
        if fut is None:
            st.lookup = None
            return Match(local, end, end)
        st.lookup, st.lookup_key = fut, key
        st.lookup_started = time.monotonic()
        return None

    def _alloc_hybrid(
        self, request: Request, st: _ReqState, m: Match, blocks: Any, priority: int = 0
    ) -> None:
        """Plans the load of ``[m.local, m.remote_end)``: every full-attention block, and per
        sliding-window group the window before the end (the non-null blocks vLLM allocated)."""
        bs = self.block_size
        local, end = m.local, m.remote_end
        hashes = self._hashes(request, end)
        uid = self._uid_fn(hashes)
        ids = blocks.get_block_ids()
        units: list[Unit] = []
        wrong: list[tuple[int, int]] = []
        needs = [(g, local) for g in self._full] + [(g, max(local, end - w)) for g, w in self._windows]
        for g, start in needs:
            for i in range(start, end):
                bid = int(ids[g][i]) if i < len(ids[g]) else kv_format.NULL_BLOCK_ID
                if bid == kv_format.NULL_BLOCK_ID:
                    wrong.append((g, i))  # vLLM disagrees with the hit rule: never write block 0
                    continue
                units.append(Unit(g, i, uid(g, i), bid))
        if wrong:
            logger.warning(
                "Membrain: req %s got null blocks for (group, block) %s of its hit; not loaded",
                request.request_id,
                wrong[:4],
            )
        plan, remote_pos = self.tiers.plan_load_units(units, priority)
        self._pending_loads[request.request_id] = plan
        st.remote_tokens = len(remote_pos) * bs
        st.host_tokens = (end - local) * bs - st.remote_tokens

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if not self.enabled:
            return
        st = self._state(request)
        m, st.match = st.match, None
        st.remote_known, st.lookup = None, None  # a later admission (preemption) asks afresh
        st.host_tokens = st.remote_tokens = 0
        if m is None:
            return
        n = max(0, num_external_tokens) // self.block_size
        m = Match(m.local, min(m.host_end, m.local + n), min(m.remote_end, m.local + n))
        asked = max(0, (request.num_prompt_tokens - 1) // self.block_size - m.local)
        self._stats.add(lookup_blocks=asked, hit_blocks_host=m.host_blocks, hit_blocks_remote=m.remote_blocks)
        if num_external_tokens <= 0:
            return
        priority = self._priority(request)
        if self.hybrid:
            self._alloc_hybrid(request, st, m, blocks, priority)
        else:
            hashes = self._hashes(request, m.remote_end)
            block_ids = blocks.get_block_ids()[0]
            self._pending_loads[request.request_id] = self.tiers.plan_load(m, hashes, block_ids, priority)
            st.host_tokens = m.host_blocks * self.block_size
            st.remote_tokens = m.remote_blocks * self.block_size
        logger.info(
            "MEMBRAIN HIT req=%s tokens=%d local=%d host=%d remote=%d",
            request.request_id,
            request.num_tokens,
            m.local * self.block_size,
            st.host_tokens,
            st.remote_tokens,
        )

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        """Host-tier and remote-tier tokens apart, so vLLM's metrics tell the tiers apart."""
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        if num_external_tokens == 0:
            return {}
        st = self._reqs.get(request.request_id)
        host = min(st.host_tokens, num_external_tokens) if st else 0
        out = {CacheHitSource.HOST: host, CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens - host}
        return {k: v for k, v in out.items() if v > 0}

    # ---------------------------------------------------------------- per step

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> MembrainMetadata:
        meta = MembrainMetadata(host_capacity=self.host_capacity, epoch=self.epoch)
        meta.clear_host, self._clear_host = self._clear_host, False
        meta.idle_step = _scheduled_tokens(scheduler_output) == 0
        if not self.enabled:
            return meta
        meta.loads, self._pending_loads = self._pending_loads, {}
        self._failures.loading(meta.loads)
        steps: list[tuple[str, int, bool]] = []
        for nr in scheduler_output.scheduled_new_reqs:
            steps.append((nr.req_id, nr.num_computed_tokens, True))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            steps.append((rid, cached.num_computed_tokens[i], rid in cached.resumed_req_ids))
        bs = self.block_size
        seen: set[bytes] = set()
        for rid, ncomp, fresh in steps:
            st = self._reqs.get(rid)
            if st is None:
                continue
            req = st.request
            if fresh and st.stored_upto < 0:
                st.stored_upto = ncomp // bs  # local and loaded blocks are already held somewhere
            scheduled = scheduler_output.num_scheduled_tokens.get(rid, 0)
            full = min(ncomp + scheduled, req.num_prompt_tokens) // bs
            if full <= st.stored_upto:
                continue
            hashes = self._hashes(req, full)
            if len(hashes) < full:
                continue
            if self.hybrid:
                self._store_hybrid(meta, st, req, hashes, full, seen)
                continue
            ids = self.kv_cache_manager.get_block_ids(rid)[0] if self.kv_cache_manager else []
            if len(ids) < full:
                continue
            rng = [i for i in range(st.stored_upto, full) if hashes[i] not in seen]
            seen.update(hashes[i] for i in rng)
            st.stored_upto = full
            if rng:
                plan = self.tiers.plan_store(
                    [hashes[i] for i in rng], [ids[i] for i in rng], self._priority(req)
                )
                meta.stores[rid] = plan
                self._events.stored(req, hashes, rng, plan)
        meta.evict = self.tiers.take_evictions()
        self._events.removed(meta.evict)
        return meta

    def _window_mask(self, group: int, request: Any, start: int, end: int) -> list[bool] | None:
        """Which sliding-window blocks ``[start, end)`` vLLM's own prefix cache keeps reachable
        (``SlidingWindowManager.reachable_block_mask`` with this config's
        ``prefix_cache_retention_interval``): None = all (vLLM's default, dense retention)."""
        interval = getattr(self.vllm_config.cache_config, "prefix_cache_retention_interval", None)
        if interval is None:
            return None
        try:
            from vllm.v1.core.kv_cache_coordinator import replay_boundaries
            from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

            bs = self.block_size
            boundaries = list(replay_boundaries(int(request.num_prompt_tokens), bs, use_eagle=False))
            if getattr(request, "shared_prefix_boundary", None):
                boundaries.append(int(request.shared_prefix_boundary))
            spec = self.kv_cache_config.kv_cache_groups[group].kv_cache_spec
            mask: list[bool] | None = SlidingWindowManager.reachable_block_mask(
                start_block=start,
                end_block=end,
                alignment_tokens=bs,
                kv_cache_spec=spec,
                use_eagle=False,
                retention_interval=int(interval),
                reachable_boundaries=boundaries,
            )
            return mask
        except Exception:  # a vLLM without the mask: store every window block
            return None

    def _store_hybrid(
        self, meta: MembrainMetadata, st: _ReqState, req: Any, hashes: list[bytes], full: int, seen: set[Any]
    ) -> None:
        """Plans the stores of block positions ``[st.stored_upto, full)`` of every group (they
        were computed in this step, so no sliding-window block among them is freed yet)."""
        if self.kv_cache_manager is None:
            return
        rid = req.request_id
        ids = self.kv_cache_manager.get_block_ids(rid)
        start = st.stored_upto
        if any(len(ids[g]) < full for g in self._full):
            return
        uid = self._uid_fn(hashes)
        units: list[Unit] = []
        for g in self._full:
            units += [Unit(g, i, uid(g, i), int(ids[g][i])) for i in range(start, full)]
        for g, _w in self._windows:
            mask = self._window_mask(g, req, start, full)
            for i in range(start, min(full, len(ids[g]))):
                if (mask is None or mask[i - start]) and int(ids[g][i]) != kv_format.NULL_BLOCK_ID:
                    units.append(Unit(g, i, uid(g, i), int(ids[g][i])))
        st.stored_upto = full
        units = [u for u in units if u.uid not in seen]
        seen.update(u.uid for u in units)
        if units:
            plan = self.tiers.plan_store_units(units, self._priority(req))
            meta.stores[rid] = plan
            self._events.stored(req, hashes, plan.positions, plan)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Stores gather into host slots within the step that computed the blocks (CPU: done by
        # then; CUDA: queued on the step's stream, so any reuse of the blocks is queued after
        # them): the device blocks are never read after the request ends, free them now.
        # A request that ends while its load is in flight (WAITING_FOR_REMOTE_KVS) keeps its
        # blocks on vLLM's side until the workers report it in finished_recving (they always
        # do); a load planned but not yet sent to the workers still goes out, so that report
        # comes.
        st = self._reqs.pop(request.request_id, None)  # also drops a pending lookup's answer
        if st is not None and st.lookup is not None:
            st.lookup.cancel()  # one still queued never reaches the server
        return False, None

    def take_stats(self) -> MembrainStats | None:
        """Scheduler-side figures since the last call: blocks looked up beyond vLLM's own hit,
        blocks hit per tier, host-tier evictions by reason, and failed loads once per block
        (vLLM sums them with the workers')."""
        now = self.tiers.host.evictions
        delta = {f"host_evicted_{k}": v - self._host_evicted.get(k, 0) for k, v in now.items()}
        self._host_evicted = dict(now)
        self._stats.add(**{k: v for k, v in delta.items() if v > 0})
        return self._stats.take()

    def take_events(self) -> list[Any]:
        return self._events.take()

    def update_connector_output(self, connector_output: Any) -> None:
        self._failures.update(connector_output)

    def reset_cache(self) -> bool:
        """Forget every block: the host index is cleared (workers drop their slots) and keys
        move to a new epoch, so blocks stored before (e.g. under the previous weights) are never
        read again. Returns True (vLLM's contract for a successful reset)."""
        self.epoch = uuid.uuid4().hex[:12]
        self.identity = mkeys.identity_digest(self._fields, self.epoch)
        self._group_ids = self._identities()
        self.tiers.reset()
        self._clear_host = True
        self._events.cleared()
        for st in self._reqs.values():
            if st.lookup is not None:
                st.lookup.cancel()
            st.match, st.remote_known, st.lookup = None, None, None
        logger.info("Membrain cache reset: new key epoch %s, identity %s", self.epoch, self.identity)
        return True
