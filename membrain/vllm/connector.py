"""MembrainConnector: vLLM 0.32 ``KVConnectorBase_V1`` adapter over Membrain's tiers.

Scheduler side (engine core): :class:`~membrain.tiers.manager.TierManager` decides what each
waiting request loads from the host and remote tiers and which newly computed full prompt blocks
are stored; the plan travels to the workers in :class:`MembrainMetadata`.

Worker side: loads are synchronous in ``start_load_kv`` (vLLM calls it before the forward when a
step has sync loads); stores gather the step's newly full blocks into host-pool slots in
``wait_for_save`` -- after that the device blocks are free -- and ship slots to the remote tier
in the background. Any failed load is reported via ``get_block_ids_with_load_errors`` and, with
``kv_load_failure_policy="recompute"``, vLLM recomputes those blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from membrain import ops
from membrain.tiers.host import HostStore
from membrain.tiers.manager import LoadPlan, StorePlan, TierManager
from membrain.tiers.remote import RemoteTier, make_client
from membrain.vllm import config as mcfg
from membrain.vllm import keys as mkeys
from membrain.vllm.stats import MembrainStats, StatsRecorder

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.membrain")

HOST_HEADROOM_BLOCKS = 64
MATCH_TTL_S = 1.0


@dataclass
class MembrainMetadata(KVConnectorMetadata):
    host_capacity: int = 0
    loads: dict[str, LoadPlan] = field(default_factory=dict)
    stores: dict[str, StorePlan] = field(default_factory=dict)
    evict: list[bytes] = field(default_factory=list)


@dataclass
class _ReqState:
    request: Any
    stored_upto: int = -1  # block index up to which prompt blocks are stored or skipped
    match: Any = None
    match_key: tuple[int, int] = (-1, -1)
    match_time: float = 0.0


def _block_bytes(kv_cache_config: Any) -> int:
    g = kv_cache_config.kv_cache_groups[0]
    return int(g.kv_cache_spec.page_size_bytes) * len(g.layer_names)


class MembrainConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.settings = mcfg.resolve(extra)  # ConfigError -> start-up error
        self.block_size = int(vllm_config.cache_config.block_size)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        self.enabled = len(groups) == 1
        if not self.enabled:
            logger.warning("Membrain disabled: %d KV cache groups (only one is supported)", len(groups))
        self.block_bytes = _block_bytes(kv_cache_config) if self.enabled else 0
        self.host_capacity = self.settings.cpu_cache_bytes // self.block_bytes if self.block_bytes else 0
        self._remote: RemoteTier | None = None
        if self.enabled and self.settings.remote:
            client = make_client(self.settings.endpoints, self.settings.namespace, self.settings.timeout_ms)
            if client is not None:
                self._remote = RemoteTier(client, self.settings.max_inflight, self.settings.timeout_ms)
        self._hash_ratio = 1
        if self.enabled and role == KVConnectorRole.SCHEDULER:
            # request.block_hashes are per *hash* block; a KV block's key must be the chained hash
            # that ends at that KV block's last token.
            try:
                from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

                sched_bs, hash_bs = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
            except Exception:
                sched_bs, hash_bs = self.block_size, self.block_size
            if sched_bs != self.block_size or hash_bs <= 0 or self.block_size % hash_bs:
                logger.warning(
                    "Membrain disabled: block size %s / hash block size %s unsupported", sched_bs, hash_bs
                )
                self.enabled = False
            else:
                self._hash_ratio = self.block_size // hash_bs
        if role == KVConnectorRole.SCHEDULER:
            ident = mkeys.identity_digest(mkeys.identity_fields(vllm_config, kv_cache_config, 0, 0))
            self._identity = ident
            self._tiers = TierManager(self.host_capacity, self._remote, lambda h: mkeys.block_key(ident, h))
            self._reqs: dict[str, _ReqState] = {}
            self._pending_loads: dict[str, LoadPlan] = {}
            logger.info(
                "Membrain scheduler: host tier %d blocks (%.1f MiB), remote %s, identity %s",
                self.host_capacity,
                self.settings.cpu_cache_bytes / 2**20,
                ",".join(self.settings.endpoints) if self._remote else "off",
                ident,
            )
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            tp_rank, pp_rank = get_tp_group().rank_in_group, get_pp_group().rank_in_group
            self._identity = mkeys.identity_digest(
                mkeys.identity_fields(vllm_config, kv_cache_config, tp_rank, pp_rank)
            )
            self._layer_names = list(groups[0].layer_names) if self.enabled else []
            self._kv: ops.PagedKV | None = None
            self._store: HostStore | None = None
            self._failed: set[int] = set()
            self._failed_reqs: set[str] = set()
            self._stats = StatsRecorder()

    # ------------------------------------------------------------------ scheduler side

    def _hashes(self, request: Request, n_blocks: int) -> list[bytes]:
        hs = list(request.block_hashes)
        r = self._hash_ratio
        if r > 1:
            hs = hs[r - 1 :: r]  # the hash ending at each KV block's last token
        return [bytes(h) for h in hs[:n_blocks]]

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self.enabled:
            return 0, False
        bs = self.block_size
        local = num_computed_tokens // bs
        max_blocks = (request.num_tokens - 1) // bs  # always leave the last token to compute
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request)
        key = (local, max_blocks)
        now = time.monotonic()
        # vLLM may ask again every step while the request waits: reuse a fresh answer instead of
        # a remote round trip per step.
        if st.match is None or st.match_key != key or now - st.match_time > MATCH_TTL_S:
            hashes = self._hashes(request, max_blocks)
            st.match = self._tiers.match(hashes, local, len(hashes))
            st.match_key, st.match_time = key, now
        ext = (st.match.remote_end - local) * bs
        return max(0, ext), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if not self.enabled:
            return
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request)
        m, st.match = st.match, None
        if num_external_tokens <= 0 or m is None:
            return
        n = num_external_tokens // self.block_size
        from membrain.tiers.manager import Match

        m = Match(m.local, min(m.host_end, m.local + n), min(m.remote_end, m.local + n))
        hashes = self._hashes(request, m.remote_end)
        block_ids = blocks.get_block_ids()[0]
        plan = self._tiers.plan_load(m, hashes, block_ids)
        self._pending_loads[request.request_id] = plan
        logger.info(
            "MEMBRAIN HIT req=%s tokens=%d local=%d host=%d remote=%d",
            request.request_id,
            request.num_tokens,
            m.local * self.block_size,
            m.host_blocks * self.block_size,
            m.remote_blocks * self.block_size,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = MembrainMetadata(host_capacity=self.host_capacity)
        if not self.enabled:
            return meta
        meta.loads, self._pending_loads = self._pending_loads, {}
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
            full = min(ncomp + scheduler_output.num_scheduled_tokens.get(rid, 0), req.num_prompt_tokens) // bs
            if full <= st.stored_upto:
                continue
            hashes = self._hashes(req, full)
            if len(hashes) < full:
                continue
            ids = self._kv_cache_manager.get_block_ids(rid)[0] if self._kv_cache_manager else []
            if len(ids) < full:
                continue
            rng = [i for i in range(st.stored_upto, full) if hashes[i] not in seen]
            seen.update(hashes[i] for i in rng)
            st.stored_upto = full
            if rng:
                meta.stores[rid] = self._tiers.plan_store([hashes[i] for i in rng], [ids[i] for i in rng])
        meta.evict = self._tiers.take_evictions()
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Stores gather into host slots within the step that computed the blocks, so the device
        # blocks are never read after the request ends: free them now.
        self._reqs.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        try:
            layers = [kv_caches[n] for n in self._layer_names]
            self._kv = ops.describe_kv_caches(layers)
        except Exception as e:
            logger.warning("Membrain disabled on this worker: unsupported KV cache tensors (%s)", e)
            self.enabled = False
            return
        t = layers[0]
        logger.info(
            "Membrain worker: %d layers, shape %s stride %s dtype %s, %d bytes/block, identity %s",
            len(layers),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            self._kv.packed_nbytes(1),
            self._identity,
        )

    def _host(self, capacity: int) -> HostStore | None:
        """The host tier's slots (``capacity`` blocks, from the scheduler) plus staging headroom
        for remote transfers; created on first use, also with capacity 0 when remote is on."""
        if self._store is None and self._kv is not None and (capacity > 0 or self._remote is not None):
            headroom = HOST_HEADROOM_BLOCKS
            if self._remote is not None:
                headroom = max(headroom, min(self.settings.max_inflight, 4 * HOST_HEADROOM_BLOCKS))
            self._store = HostStore(
                self._kv.packed_nbytes(1), capacity, headroom, pin=self._kv.device_type == "cuda"
            )
        return self._store

    def _sync(self) -> None:
        if self._kv is not None and self._kv.device_type == "cuda":
            torch.cuda.current_stream(self._kv.device_index).synchronize()

    def _key(self, h: bytes) -> bytes:
        return mkeys.block_key(self._identity, h)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if not self.enabled or self._kv is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, MembrainMetadata)
        store = self._host(meta.host_capacity)
        self._failed_reqs = set()
        bb = self._kv.packed_nbytes(1)
        for rid, plan in meta.loads.items():
            t0 = time.perf_counter()
            failed: list[int] = []
            keys = [self._key(h) for h in plan.hashes]
            host_idx = [i for i, r in enumerate(plan.from_remote) if not r]
            rem_idx = [i for i, r in enumerate(plan.from_remote) if r]
            if host_idx:
                oks = (
                    store.load(self._kv, [plan.block_ids[i] for i in host_idx], [keys[i] for i in host_idx])
                    if store is not None
                    else [False] * len(host_idx)
                )
                failed += [plan.block_ids[i] for i, ok in zip(host_idx, oks) if not ok]
            if rem_idx:
                # Fetch into pool slots (pinned on CUDA); pageable scratch only on CPU.
                bufs: list[Any] = []
                for i in rem_idx:
                    slot = store.acquire() if store is not None else None
                    if slot is None and self._kv.device_type == "cpu":
                        slot = bytearray(bb)
                    bufs.append(slot)
                want = [j for j, b in enumerate(bufs) if b is not None]
                got = (
                    self._remote.get_into([keys[rem_idx[j]] for j in want], [bufs[j] for j in want])
                    if self._remote is not None
                    else [False] * len(want)
                )
                oks = [False] * len(rem_idx)
                for j, ok in zip(want, got):
                    oks[j] = ok
                keep: list[tuple[bytes, Any]] = []
                for j, (i, buf, ok) in enumerate(zip(rem_idx, bufs, oks)):
                    if ok:
                        ops.scatter_blocks(buf, self._kv, [plan.block_ids[i]])
                    else:
                        failed.append(plan.block_ids[i])
                    if buf is not None and not isinstance(buf, bytearray):
                        keep.append((keys[i], buf) if ok and plan.promote[i] else (b"", buf))
                self._sync()  # scatters done before any slot is reused or released
                for k, buf in keep:
                    if k:
                        store.insert(k, buf)  # promotion into the host tier
                    else:
                        buf.release()
            n_host_ok = len(host_idx) - sum(1 for i in host_idx if plan.block_ids[i] in failed)
            n_rem_ok = len(rem_idx) - sum(1 for i in rem_idx if plan.block_ids[i] in failed)
            self._stats.add(
                load_tokens_host=n_host_ok * self.block_size,
                load_tokens_remote=n_rem_ok * self.block_size,
                load_bytes_host=n_host_ok * bb,
                load_bytes_remote=n_rem_ok * bb,
                load_failed_blocks=len(failed),
                load_seconds=time.perf_counter() - t0,
                loads=1,
            )
            if failed:
                self._failed.update(failed)
                self._failed_reqs.add(rid)
                logger.warning(
                    "Membrain load for req %s: %d of %d blocks failed; vLLM recomputes them",
                    rid,
                    len(failed),
                    len(plan.block_ids),
                )
            logger.debug(
                "Membrain load req=%s %d blocks in %.1f ms",
                rid,
                len(plan.block_ids),
                1e3 * (time.perf_counter() - t0),
            )
        self._sync()
        if store is not None and meta.evict:
            store.evict(self._key(h) for h in meta.evict)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        if not self.enabled or self._kv is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, MembrainMetadata)
        store = self._host(meta.host_capacity)
        failed_reqs = self._failed_reqs
        bb = self._kv.packed_nbytes(1)
        for rid, plan in meta.stores.items():
            t0 = time.perf_counter()
            if rid in failed_reqs:
                continue  # this step computed on top of a failed load: its KV must not be stored
            keys = [self._key(h) for h in plan.hashes]
            host_slots: list[Any] = [None] * len(keys)
            hi = [i for i, f in enumerate(plan.to_host) if f]
            if hi and store is not None:
                got = store.store(self._kv, [plan.block_ids[i] for i in hi], [keys[i] for i in hi])
                for i, s in zip(hi, got):
                    host_slots[i] = s
            n_remote = 0
            if self._remote is not None and self._remote.available:
                rk, rv, handles = [], [], []
                for i, f in enumerate(plan.to_remote):
                    if not f:
                        continue
                    s = store.get(keys[i]) if store is not None else None
                    if s is not None:
                        h = s.share()
                    else:
                        h = store.acquire() if store is not None else None
                        if h is None:
                            continue
                        ops.gather_blocks(self._kv, [plan.block_ids[i]], h)
                    rk.append(keys[i])
                    rv.append(memoryview(h))
                    handles.append(h)
                self._sync()  # gathers complete before the bytes are shipped (CUDA)
                if rk:
                    stats = self._stats
                    bs = self.block_size

                    def done(res: list[bool], handles: list[Any] = handles) -> None:
                        for h in handles:
                            h.release()
                        ok = sum(1 for r in res if r)
                        stats.add(
                            store_tokens_remote=ok * bs,
                            store_bytes_remote=ok * bb,
                            store_dropped_blocks=len(res) - ok,
                        )

                    if self._remote.put_async(rk, rv, done):
                        n_remote = len(rk)
                    else:
                        self._stats.add(store_dropped_blocks=len(rk))
                        for h in handles:
                            h.release()
            self._sync()
            n_host = sum(1 for i in hi if host_slots[i] is not None)
            self._stats.add(
                store_tokens_host=n_host * self.block_size,
                store_bytes_host=n_host * bb,
                store_seconds=time.perf_counter() - t0,
                stores=1,
            )
            logger.info(
                "MEMBRAIN STORE req=%s tokens=%d host=%d remote=%d (remote shipped asynchronously)",
                rid,
                len(keys) * self.block_size,
                n_host * self.block_size,
                n_remote * self.block_size,
            )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._role != KVConnectorRole.WORKER or not self._failed:
            return set()
        out, self._failed = self._failed, set()
        return out

    def get_kv_connector_stats(self) -> MembrainStats | None:
        if self._role != KVConnectorRole.WORKER:
            return None
        return self._stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> MembrainStats:
        return MembrainStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: Any,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        from membrain.vllm.stats import MembrainPromMetrics

        return MembrainPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._remote is not None:
            # Let stores already shipped finish (bounded), so an instance that exits right after
            # its last request still leaves its blocks for the next one.
            if not self._remote.drain(2 * self.settings.timeout_ms / 1000.0):
                logger.warning(
                    "Membrain: %d blocks still in flight at shutdown; dropped", self._remote.inflight
                )
            self._remote.close()
