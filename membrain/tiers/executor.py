"""Worker-side execution of the scheduler's tier plans: the data movement of loads and stores.

The scheduler (:class:`~membrain.tiers.manager.TierManager`) decides which blocks come from or go
to which tier; every worker runs the same :class:`LoadPlan` / :class:`StorePlan` on its own KV
cache through a :class:`TierExecutor`, which owns the host store (pinned slots) and the remote
tier. Every block a plan asked for either lands or is returned as failed, so the caller can
report it to vLLM, which recomputes it: no outcome is silent.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from membrain import ops
from membrain.tiers.host import HostStore
from membrain.tiers.manager import LoadPlan, StorePlan
from membrain.tiers.remote import RemoteTier
from membrain.utils.affinity import enter_background

logger = logging.getLogger("membrain.tiers.executor")


def thread_minor_faults() -> int:
    """Minor page faults of the calling thread so far (0 where the OS does not say). Loads count
    the faults of their fetches and scatters: a first touch of fresh host slots or of KV pages
    costs a fault per 4 KiB page, which is where a load falls behind a GET into warm buffers."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    except (AttributeError, OSError, ValueError):
        return 0


# Slots kept beyond the host tier's capacity for staging remote transfers: HOST_HEADROOM_BLOCKS,
# or with a remote tier up to 4x that for stores in flight (max_inflight), but never more than
# HOST_HEADROOM_BYTES: they are resident from start-up (prefaulted or pinned), and 256 blocks
# of a model with 8 MiB blocks would be 2 GiB. A store finding no free slot is dropped and
# counted. Never fewer than one load's fetch pipeline holds at once (see staging_blocks).
HOST_HEADROOM_BLOCKS = 64
HOST_HEADROOM_BYTES = 512 << 20
# A background load fetches its remote blocks in chunks of at most FETCH_CHUNK_BLOCKS blocks and
# FETCH_CHUNK_BYTES bytes, while the chunk before them is scattered. A load started in a step
# that schedules nothing else (every request waits for its KV) fetches FETCH_STREAMS chunks at a
# time, each on its own connection: one TCP connection's receive is one thread's copy, and on the
# 2-core box `membrain bench transfer` GETs 16 x 1 MiB at 1.44 GB/s on one connection, 2.4-2.6
# GB/s on four. A load started beside running requests fetches one chunk at a time, so it takes
# less of the CPU they decode on. At most streams + 1 chunks of staging slots are held.
FETCH_CHUNK_BLOCKS = 16
FETCH_CHUNK_BYTES = 32 << 20
FETCH_STREAMS = 3
# Niceness added to the background load threads (fetch, checksum, scatter calls): a load must
# never slow the requests the engine is decoding meanwhile, so where CPU is short the engine's
# threads go first and the load takes the slack (Linux: per-thread niceness).
LOAD_THREAD_NICE = 10


def fetch_chunk_blocks(block_bytes: int) -> int:
    """Blocks per remote fetch of a load, for blocks of ``block_bytes``."""
    return max(1, min(FETCH_CHUNK_BLOCKS, FETCH_CHUNK_BYTES // max(1, block_bytes)))


def staging_blocks(block_bytes: int, remote: bool, max_inflight: int) -> int:
    """Staging slots beside the host tier's (see HOST_HEADROOM_BLOCKS)."""
    blocks = HOST_HEADROOM_BLOCKS
    if remote:
        blocks = max(blocks, min(max_inflight, 4 * HOST_HEADROOM_BLOCKS))
    pipeline = (FETCH_STREAMS + 1) * fetch_chunk_blocks(block_bytes)  # chunks in flight + scattering
    return max(pipeline, min(blocks, HOST_HEADROOM_BYTES // max(1, block_bytes)))


def _background_priority() -> None:
    """ThreadPoolExecutor initializer of the load threads: lower priority, background CPUs."""
    enter_background(LOAD_THREAD_NICE)


@dataclass
class LoadResult:
    failed_block_ids: list[int]
    host_blocks: int = 0  # loaded from the host tier
    remote_blocks: int = 0  # loaded from the remote tier
    # Plan indices of the units that landed, per tier (stats count block positions once).
    host_units: list[int] = field(default_factory=list)
    remote_units: list[int] = field(default_factory=list)


@dataclass
class LoadJob:
    """One request's load of a step: the plan, its keys, and (when done) its outcome."""

    req_id: str
    plan: LoadPlan
    keys: list[bytes]
    result: LoadResult | None = None
    error: str = ""  # why blocks failed beyond plain misses ("" when only misses)
    seconds: float = 0.0  # from start to completion
    t0: float = 0.0
    # Where the time went (seconds; the remote ones are the whole batch's, shared by its jobs):
    # queued behind earlier loads, host-tier scatter, waiting for remote fetches, remote scatter.
    times: dict[str, float] = field(default_factory=dict)
    # Minor page faults on the fetch threads and the scatter thread (the batch's, as ``times``).
    faults: dict[str, int] = field(default_factory=dict)
    host_idx: list[int] = field(default_factory=list)
    host_slots: list[Any] = field(default_factory=list)
    landed: set[int] = field(default_factory=set)
    ready: Any = None  # CUDA: event the side stream waits on before scattering
    # Started in a step that runs other requests (set by start_loads): its remote chunks are
    # fetched one at a time instead of fetch_streams at a time, and on CPU it scatters on the
    # niced loader thread alone, since the shared copy pool runs at the engine's priority.
    beside_work: bool = False
    ctx: Any = None  # the caller's (e.g. a tracing span)

    @property
    def copy_threads(self) -> int:
        """CPU copy threads of its scatters (ops.scatter_blocks' ``threads``; 0: the pool)."""
        return 1 if self.beside_work else 0


@dataclass
class StoreResult:
    host_blocks: int = 0  # now held by the host tier
    remote_blocks: int = 0  # shipped to the remote tier (asynchronously)
    dropped_blocks: int = 0  # not shipped (back-pressure, no slot, remote down)
    host_units: list[int] = field(default_factory=list)  # plan indices held by the host tier
    remote_units: list[int] = field(default_factory=list)  # ... and shipped


class TierExecutor:
    """Runs load and store plans for one worker's KV cache (``kv``, described by
    :func:`membrain.ops.describe_kv_caches`; a list with one description per KV-cache group for
    hybrid models, the unit ``i`` of a plan then being a block of group ``plan.groups[i]``, all
    groups with the same packed size). The step thread never waits for the device or the
    network: loads run on a loader thread (CUDA: on a side stream), stores are ordered on the
    device with events (see :meth:`store`)."""

    def __init__(
        self, kv: ops.PagedKV | Sequence[ops.PagedKV], remote: RemoteTier | None, max_inflight: int
    ) -> None:
        self.kvs: list[ops.PagedKV] = [kv] if isinstance(kv, ops.PagedKV) else list(kv)
        kv = self.kvs[0]
        if any(k.packed_nbytes(1) != kv.packed_nbytes(1) for k in self.kvs):
            raise ValueError("KV-cache groups with different bytes per block")
        self.kv = kv
        self.remote = remote
        self.max_inflight = max_inflight
        self.store_: HostStore | None = None
        self.block_bytes = kv.packed_nbytes(1)
        self.fetch_chunk_blocks = fetch_chunk_blocks(self.block_bytes)
        self.fetch_streams = FETCH_STREAMS
        self._loader: ThreadPoolExecutor | None = None
        self._fetcher: ThreadPoolExecutor | None = None
        self._side: Any = None  # CUDA side stream of the loads
        self._shipper: ThreadPoolExecutor | None = None  # CUDA: remote puts after the gathers
        self._last_store_fence: Any = None  # CUDA: event after the latest gathers
        self._jobs_lock = threading.Lock()
        self._job_done = threading.Condition(self._jobs_lock)
        self._done_jobs: list[LoadJob] = []
        self._inflight_jobs = 0
        self._cancelled: set[str] = set()
        self._promoting: dict[bytes, int] = {}  # key -> loads that will promote it

    def _kv(self, plan: LoadPlan | StorePlan, i: int) -> ops.PagedKV:
        """The KV description of unit ``i`` of ``plan`` (its KV-cache group's)."""
        return self.kvs[plan.groups[i]] if plan.groups else self.kv

    def host(self, capacity_blocks: int) -> HostStore | None:
        """The host tier's slots (``capacity_blocks`` from the scheduler) plus staging headroom
        for remote transfers; created on first use, also with capacity 0 when remote is on."""
        if self.store_ is None and (capacity_blocks > 0 or self.remote is not None):
            headroom = staging_blocks(self.block_bytes, self.remote is not None, self.max_inflight)
            self.store_ = HostStore(
                self.block_bytes, capacity_blocks, headroom, pin=self.kv.device_type == "cuda"
            )
        return self.store_

    def open_host(self, capacity_blocks: int, prefault: bool) -> None:
        """Creates the host tier's slots at start-up (rather than in the first step that uses
        them) and, with ``prefault``, backs them with memory before returning."""
        store = self.host(capacity_blocks)
        if store is not None and prefault:
            store.prefault()

    # ---------------------------------------------------------------- loads

    def load(self, plan: LoadPlan, keys: Sequence[bytes], host_capacity: int) -> LoadResult:
        """Loads every block of ``plan`` now (the synchronous form of :meth:`start_loads`)."""
        job = LoadJob("", plan, list(keys))
        self._prepare([job], host_capacity)
        try:
            self._run([job])
        except Exception as e:
            logger.exception("Membrain load failed")
            self._fail(job, f"load error: {e}")
        finally:
            self._release_promotions([job])
            self._cleanup(job)
        assert job.result is not None
        return job.result

    def start_loads(self, jobs: Sequence[LoadJob], host_capacity: int, beside_work: bool = False) -> None:
        """Starts the loads of one step in the background (one loader thread, jobs in order):
        host-tier blocks are scattered from their slots, remote blocks of all jobs are fetched
        in one batch, in chunks fetched ``fetch_streams`` at a time (one at a time when the
        step runs other requests: ``beside_work``) while the one before them is scattered,
        and promoted where the plan says. Each job's outcome comes back through
        :meth:`poll_loads`; every job comes back exactly once, also on errors (then with its
        blocks failed)."""
        if not jobs:
            return
        jobs = list(jobs)
        for j in jobs:
            j.beside_work = beside_work
        try:
            self._prepare(jobs, host_capacity)
        except Exception as e:
            logger.exception("Membrain: preparing loads failed")
            for j in jobs:
                self._fail(j, f"load error: {e}")
                self._finished(j)
            return
        if self._loader is None:
            self._loader = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="membrain-load", initializer=_background_priority
            )
            self._fetcher = ThreadPoolExecutor(
                max_workers=max(1, self.fetch_streams),
                thread_name_prefix="membrain-fetch",
                initializer=_background_priority,
            )
        with self._jobs_lock:
            self._inflight_jobs += len(jobs)
        self._loader.submit(self._run_and_post, jobs)

    def wait_for_loads(self, timeout_s: float) -> None:
        """Returns when a load finished since the last :meth:`poll_loads`, when none is in
        flight, or after ``timeout_s``."""
        with self._job_done:
            if not self._done_jobs and self._inflight_jobs:
                self._job_done.wait(timeout_s)

    def poll_loads(self) -> list[LoadJob]:
        """Jobs finished since the last call (their ``result`` set)."""
        with self._jobs_lock:
            out, self._done_jobs = self._done_jobs, []
            for j in out:  # a cancel that raced with the completion
                self._cancelled.discard(j.req_id)
        return out

    @property
    def loads_in_flight(self) -> int:
        with self._jobs_lock:
            return self._inflight_jobs

    def cancel_load(self, req_id: str) -> None:
        """The request ended: its blocks are no longer written (it still comes back through
        :meth:`poll_loads`, with the skipped blocks failed)."""
        with self._jobs_lock:
            self._cancelled.add(req_id)

    def wait_loads(self, timeout_s: float) -> bool:
        """Waits for every started load (tests, shutdown); True when none is left."""
        deadline = time.monotonic() + timeout_s
        while self.loads_in_flight and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.loads_in_flight == 0

    def _prepare(self, jobs: Sequence[LoadJob], host_capacity: int) -> None:
        """Step thread: takes references to the host-tier slots the jobs read (a later eviction
        cannot free them mid-load) and registers the promotions (an eviction before the load
        lands cancels them, so the host tier never holds a key the scheduler dropped)."""
        store = self.host(host_capacity)
        ready = None
        if self.kv.device_type == "cuda":
            import torch

            # The side stream starts after everything already queued on the step's stream.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.kv.device_index))
        for j in jobs:
            j.ready = ready
            plan = j.plan
            j.result = LoadResult([])
            j.t0 = time.perf_counter()
            host_idx = [i for i, r in enumerate(plan.from_remote) if not r]
            if store is None:
                j.host_slots = [None] * len(host_idx)
            else:
                j.host_slots = store.share([j.keys[i] for i in host_idx])
                with store.lock:
                    for i, r in enumerate(plan.from_remote):
                        if r and plan.promote[i]:
                            self._promoting[j.keys[i]] = self._promoting.get(j.keys[i], 0) + 1
            j.host_idx = host_idx

    def _fail(self, j: LoadJob, reason: str) -> None:
        res = j.result if j.result is not None else LoadResult([])
        done = set(res.failed_block_ids)
        res.failed_block_ids = list(res.failed_block_ids) + [
            b for b in j.plan.block_ids if b not in done and b not in j.landed
        ]
        j.result = res
        j.error = j.error or reason

    def _cleanup(self, j: LoadJob) -> None:
        j.seconds = time.perf_counter() - j.t0
        for s in j.host_slots:
            if s is not None:
                s.release()
        j.host_slots = []
        j.ready = None

    def _finished(self, j: LoadJob) -> None:
        self._cleanup(j)
        with self._jobs_lock:
            self._done_jobs.append(j)
            self._job_done.notify_all()

    def _run_and_post(self, jobs: list[LoadJob]) -> None:
        try:
            self._run(jobs)
        except Exception as e:  # a device or pool error: recompute, never a crash
            logger.exception("Membrain background load failed")
            for j in jobs:
                self._fail(j, f"load error: {e}")
        finally:
            self._release_promotions(jobs)
            for j in jobs:
                self._finished(j)
            with self._jobs_lock:
                self._inflight_jobs -= len(jobs)
                for j in jobs:
                    self._cancelled.discard(j.req_id)

    def _release_promotions(self, jobs: Sequence[LoadJob]) -> None:
        store = self.store_
        if store is None:
            return
        with store.lock:
            for j in jobs:
                for i, r in enumerate(j.plan.from_remote):
                    if r and j.plan.promote[i]:
                        k = j.keys[i]
                        n = self._promoting.get(k, 0) - 1
                        if n > 0:
                            self._promoting[k] = n
                        else:
                            self._promoting.pop(k, None)

    def _is_cancelled(self, j: LoadJob) -> bool:
        with self._jobs_lock:
            return j.req_id in self._cancelled

    def _device_stream(self) -> Any:
        """CUDA: the side stream loads scatter on (never the forward's stream)."""
        if self.kv.device_type != "cuda":
            return None
        if self._side is None:
            import torch

            self._side = torch.cuda.Stream(device=self.kv.device_index)
        return self._side

    def _device_done(self) -> None:
        """Waits for the scatters queued on the side stream (CUDA): after this the slots they
        read may be reused and the blocks are complete. No-op on CPU (synchronous copies)."""
        if self._side is not None:
            self._side.synchronize()

    def _run(self, jobs: Sequence[LoadJob]) -> None:
        t_start = time.perf_counter()
        for j in jobs:
            j.times = {"queued": t_start - j.t0, "host": 0.0, "fetch_wait": 0.0, "scatter": 0.0}
            j.faults = {"fetch": 0, "scatter": 0}
        stream = self._device_stream()
        if stream is not None:
            for ev in {id(j.ready): j.ready for j in jobs if j.ready is not None}.values():
                stream.wait_event(ev)
        # Host-tier blocks first (memory speed), per job.
        for j in jobs:
            t_host = time.perf_counter()
            f_host = thread_minor_faults()
            res = j.result
            assert res is not None
            if self._is_cancelled(j):
                self._fail(j, "request finished while loading")
                continue
            try:
                for i, slot in zip(j.host_idx, j.host_slots):
                    b = j.plan.block_ids[i]
                    if slot is None:
                        res.failed_block_ids.append(b)
                        continue
                    ops.scatter_blocks(slot, self._kv(j.plan, i), [b], stream=stream, threads=j.copy_threads)
                    j.landed.add(b)
                    res.host_blocks += 1
                    res.host_units.append(i)
            except Exception as e:
                logger.exception("Membrain host-tier load for req %s failed", j.req_id)
                self._device_done()
                self._fail(j, f"load error: {e}")
            j.times["host"] = time.perf_counter() - t_host
            j.faults["scatter"] += thread_minor_faults() - f_host
        self._device_done()
        # Remote blocks of every job: one batch, fetched in chunks (pipelined with the scatter).
        want: list[tuple[LoadJob, int]] = [
            (j, i)
            for j in jobs
            if not j.error and not self._is_cancelled(j)
            for i, r in enumerate(j.plan.from_remote)
            if r
        ]
        for j in jobs:
            if not j.error and self._is_cancelled(j):
                self._fail(j, "request finished while loading")
        if want:
            batch = list({id(j): j for j, _ in want}.values())
            streams = 1 if any(j.beside_work for j in batch) else max(1, self.fetch_streams)
            self._load_remote(want, stream, batch, streams)

    def _fetch(self, chunk: list[tuple[LoadJob, int]], streams: int) -> tuple[list[Any], list[bool], int]:
        """Fetcher thread: one remote get of ``chunk`` into pool slots (pinned on CUDA;
        pageable scratch only on CPU when the pool is short); also returns the thread's minor
        page faults meanwhile."""
        faults0 = thread_minor_faults()
        store = self.store_
        bufs: list[Any] = []
        for _ in chunk:
            slot: Any = store.acquire() if store is not None else None
            if slot is None and self.kv.device_type == "cpu":
                slot = bytearray(self.block_bytes)
            bufs.append(slot)
        want = [n for n, b in enumerate(bufs) if b is not None]
        got: list[bool] = [False] * len(want)
        if self.remote is not None and want:
            # The deadline counts the bytes of the streams sharing the link with this one.
            got = self.remote.get_into(
                [chunk[n][0].keys[chunk[n][1]] for n in want],
                [bufs[n] for n in want],
                nbytes=len(want) * self.block_bytes * max(1, streams),
            )
        oks = [False] * len(chunk)
        for n, ok in zip(want, got):
            oks[n] = ok
        return bufs, oks, thread_minor_faults() - faults0

    def _load_remote(
        self, want: list[tuple[LoadJob, int]], stream: Any, batch: list[LoadJob], streams: int
    ) -> None:
        size = max(1, self.fetch_chunk_blocks)
        chunks = [want[c : c + size] for c in range(0, len(want), size)]
        fetcher = self._fetcher
        futs: list[Future[tuple[list[Any], list[bool], int]]] = []

        def submit(c: list[tuple[LoadJob, int]]) -> Future[tuple[list[Any], list[bool], int]]:
            if fetcher is None:  # synchronous form (load())
                f: Future[tuple[list[Any], list[bool], int]] = Future()
                f.set_result(self._fetch(c, 1))
                return f
            return fetcher.submit(self._fetch, c, streams)

        ahead = max(1, streams) if fetcher is not None else 1
        for c in chunks[:ahead]:
            futs.append(submit(c))
        taken = 0
        try:
            for n, chunk in enumerate(chunks):
                taken = n + 1
                t = time.perf_counter()
                bufs, oks, fetch_faults = futs[n].result()
                t_got = time.perf_counter()
                if n + ahead < len(chunks):  # keeps `ahead` fetches in flight over this scatter
                    futs.append(submit(chunks[n + ahead]))
                f_land = thread_minor_faults()
                self._land_chunk(chunk, bufs, oks, stream)
                t_end = time.perf_counter()
                scatter_faults = thread_minor_faults() - f_land
                for j in batch:
                    j.times["fetch_wait"] += t_got - t
                    j.times["scatter"] += t_end - t_got
                    j.faults["fetch"] += fetch_faults
                    j.faults["scatter"] += scatter_faults
        finally:
            for f in futs[taken:]:  # fetched ahead but never scattered (an error above)
                try:
                    bufs, _, _ = f.result()
                except Exception:
                    continue
                for buf in bufs:
                    if buf is not None and not isinstance(buf, bytearray):
                        buf.release()
        for j, _ in want:
            if j.error:
                self._fail(j, j.error)

    def _land_chunk(
        self, chunk: list[tuple[LoadJob, int]], bufs: list[Any], oks: list[bool], stream: Any
    ) -> None:
        """Scatters a fetched chunk into its device blocks, then releases or promotes its slots."""
        keep: list[tuple[bytes, Any]] = []
        try:
            for (j, i), buf, ok in zip(chunk, bufs, oks):
                b = j.plan.block_ids[i]
                res = j.result
                assert res is not None
                if ok and not j.error and not self._is_cancelled(j):
                    try:
                        ops.scatter_blocks(
                            buf, self._kv(j.plan, i), [b], stream=stream, threads=j.copy_threads
                        )
                        j.landed.add(b)
                        res.remote_blocks += 1
                        res.remote_units.append(i)
                    except Exception as e:
                        logger.exception("Membrain remote load for req %s failed", j.req_id)
                        self._fail(j, f"load error: {e}")
                        ok = False
                else:
                    ok = False
                    if b not in j.landed and b not in res.failed_block_ids:
                        res.failed_block_ids.append(b)
                if buf is not None and not isinstance(buf, bytearray):
                    keep.append((j.keys[i], buf) if ok and j.plan.promote[i] else (b"", buf))
        finally:
            self._device_done()  # scatters done before any slot is reused or released
            for k, buf in keep:
                if k and self._promote(k, buf):
                    continue
                buf.release()

    def _promote(self, key: bytes, slot: Any) -> bool:
        """Loader thread: the host tier keeps ``slot`` for ``key`` unless the promotion was
        cancelled by an eviction (or the key is already held)."""
        store = self.store_
        if store is None:
            return False
        with store.lock:
            if key not in self._promoting:
                return False
            return store.insert_if_absent(key, slot)

    # ---------------------------------------------------------------- stores

    def store(
        self,
        plan: StorePlan,
        keys: Sequence[bytes],
        host_capacity: int,
        on_remote_done: Callable[[int, int, list[int]], None] | None = None,
    ) -> StoreResult:
        """Gathers the plan's blocks into host slots (the host tier keeps those the plan admits)
        and ships the remote ones without waiting; ``on_remote_done(stored, failed, units)`` runs
        when the remote put completes (``units``: the plan indices stored).

        CPU: the gathers are synchronous memcpys; after this returns the device blocks are no
        longer read. CUDA: the gathers are queued on the step's stream after the forward and the
        host never waits for them (no stream synchronize in the step); every later use of those
        device blocks -- vLLM's next steps, frees, zeroing -- is queued on the same stream, so
        it runs after the gathers. An event marks their end: the remote put waits for it on a
        background thread, host-tier loads (side stream) wait for it on the device, and
        evictions wait for it before a slot is handed out again."""
        store = self.host(host_capacity)
        host_slots: list[Any] = [None] * len(keys)
        hi = [i for i, f in enumerate(plan.to_host) if f]
        if hi and store is not None:
            got = store.store(
                [self._kv(plan, i) for i in hi], [plan.block_ids[i] for i in hi], [keys[i] for i in hi]
            )
            for i, s in zip(hi, got):
                host_slots[i] = s
        res = StoreResult(host_blocks=sum(1 for i in hi if host_slots[i] is not None))
        res.host_units = [i for i in hi if host_slots[i] is not None]
        to_remote = [i for i, f in enumerate(plan.to_remote) if f]
        if not to_remote:
            self._store_fence()
            return res
        if self.remote is None or not self.remote.available:
            self._store_fence()
            res.dropped_blocks = len(to_remote)
            return res
        rk: list[bytes] = []
        rv: list[memoryview] = []
        handles: list[Any] = []
        ri: list[int] = []
        for i in to_remote:
            h: Any = store.share([keys[i]])[0] if store is not None else None
            if h is None:
                h = store.acquire() if store is not None else None
                if h is None:
                    res.dropped_blocks += 1
                    continue
                ops.gather_blocks(self._kv(plan, i), [plan.block_ids[i]], h)
            rk.append(keys[i])
            ri.append(i)
            rv.append(memoryview(h))
            handles.append(h)
        fence = self._store_fence()
        if not rk:
            return res

        def done(results: list[bool]) -> None:
            for h in handles:
                h.release()
            ok = sum(1 for r in results if r)
            if on_remote_done is not None:
                on_remote_done(ok, len(results) - ok, [i for i, r in zip(ri, results) if r])

        remote = self.remote
        nbytes = len(rk) * self.block_bytes
        if fence is not None:
            # CUDA: ship once the gathers are done, without holding up the step.
            def ship() -> None:
                try:
                    fence.synchronize()
                    shipped = remote.put_async(rk, rv, done, nbytes=nbytes)
                except Exception:
                    logger.exception("Membrain: shipping stored blocks failed")
                    shipped = False
                if not shipped:
                    done([False] * len(rk))

            if self._shipper is None:
                self._shipper = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="membrain-ship", initializer=enter_background
                )
            self._shipper.submit(ship)
            res.remote_blocks = len(rk)  # failures come back through on_remote_done
            res.remote_units = list(ri)
            return res
        if remote.put_async(rk, rv, done, nbytes=nbytes):
            res.remote_blocks = len(rk)
            res.remote_units = list(ri)
        else:
            res.dropped_blocks += len(rk)
            for h in handles:
                h.release()
        return res

    def _store_fence(self) -> Any:
        """CUDA: an event recorded on the step's stream after the gathers just queued (also kept
        as the latest, see :meth:`_wait_stores`); None on CPU, where gathers are synchronous."""
        if self.kv.device_type != "cuda":
            return None
        import torch

        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.kv.device_index))
        self._last_store_fence = ev
        return ev

    def _wait_stores(self) -> None:
        """Host wait for the gathers queued so far (CUDA), before slots go back to the pool.
        Normally long done by the next step; a no-op on CPU."""
        if self._last_store_fence is not None:
            self._last_store_fence.synchronize()
            self._last_store_fence = None

    def evict_host(self, keys: Sequence[bytes]) -> None:
        """Drops ``keys`` from the host tier; a promotion of one of them still in flight is
        cancelled (the scheduler no longer counts it)."""
        store = self.store_
        if store is not None and keys:
            self._wait_stores()
            with store.lock:
                store.evict(keys)
                for k in keys:
                    self._promoting.pop(k, None)

    def clear_host(self) -> None:
        """Drops every block of the host tier (``reset_cache``)."""
        store = self.store_
        if store is not None:
            self._wait_stores()
            with store.lock:
                store.evict(store.keys())
                self._promoting.clear()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Waits (bounded) for the loads in flight and stops the loader threads."""
        self.wait_loads(timeout_s)
        for ex in (self._loader, self._fetcher, self._shipper):
            if ex is not None:
                ex.shutdown(wait=False)
