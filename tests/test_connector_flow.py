"""MembrainConnector's scheduler and worker halves driven by hand with real KV tensors (no vLLM
engine): stores, host-tier loads, remote loads with promotion, and load-failure reporting.
The remote is the dict-backed fake client of test_tiers (unit tests only)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")

from connector_driver import admit as _admit
from connector_driver import finish_loads as _finish_loads
from connector_driver import make_request
from connector_driver import matched as _matched
from connector_driver import step as _step
from fakes import FakeClient

from membrain.bench.vllm_kv import build_vllm_kv as make_vllm_kv
from membrain.bench.vllm_kv import same_bytes
from membrain.tiers.executor import staging_blocks

BS, LAYERS, BLOCKS = 4, 2, 32


@pytest.fixture()
def pair(monkeypatch):
    import vllm.distributed.parallel_state as ps
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from membrain.tiers.remote import RemoteTier
    from membrain.vllm.connector import MembrainConnector

    monkeypatch.setattr(ps, "get_tp_group", lambda: NS(rank_in_group=0))
    monkeypatch.setattr(ps, "get_pp_group", lambda: NS(rank_in_group=0))

    def make(cpu_cache: int = 1 << 20, remote: FakeClient | None = None):
        vkv = make_vllm_kv("LBHNC", num_layers=LAYERS, num_blocks=BLOCKS, block_size=BS)
        vkv.vllm_config.kv_transfer_config.kv_connector_extra_config = {
            "cpu_cache_size": cpu_cache,
            "remote": 0,
        }
        s = MembrainConnector(vkv.vllm_config, KVConnectorRole.SCHEDULER, vkv.kv_cache_config)
        w = MembrainConnector(vkv.vllm_config, KVConnectorRole.WORKER, vkv.kv_cache_config)
        if remote is not None:
            w._worker.remote = RemoteTier(remote)
            s._scheduler.remote = s._scheduler.tiers.remote = RemoteTier(remote)
        w.register_kv_caches(vkv.kv_caches)
        return s, w, vkv.kv_caches

    return make


def _req(rid: str, n_tokens: int, tag: bytes = b"p"):
    return make_request(rid, n_tokens, BS, tag)


def _same(kv, a: list[int], b: list[int]) -> bool:
    """Blocks ``a`` and ``b`` hold the same bytes in every layer (random bytes: compare bitwise)."""
    return all(same_bytes([t[a]], [t[b]]) for t in kv.values())


def test_store_then_host_hit_roundtrip(pair):
    s, w, kv = pair()
    r1 = _req("r1", 18)  # 4 full blocks + 2 tokens
    ids1 = [0, 1, 2, 3, 4]
    assert _admit(s, r1, ids1) == 0
    meta, errs = _step(s, w, r1, ids1, 0)
    assert list(meta.stores) == ["r1"] and len(meta.stores["r1"].block_ids) == 4 and not errs
    s.request_finished(r1, ids1)
    r2 = _req("r2", 18)
    ids2 = [10, 11, 12, 13, 14]
    for t in kv.values():
        t[10:15].zero_()
    assert _admit(s, r2, ids2) == 16  # all 4 full blocks; the last tokens are left to compute
    meta, errs = _step(s, w, r2, ids2, 16)
    assert not errs and meta.loads["r2"].from_remote == [False] * 4
    assert _same(kv, [0, 1, 2, 3], [10, 11, 12, 13])
    assert not meta.stores  # nothing new to store


def test_leaves_last_token_when_prompt_is_block_aligned(pair):
    s, w, _kv = pair()
    r1 = _req("r1", 16)
    _admit(s, r1, [0, 1, 2, 3])
    _step(s, w, r1, [0, 1, 2, 3], 0)
    assert _admit(s, _req("r2", 16), [5, 6, 7, 8]) == 12


def test_load_failure_reported(pair):
    s, w, _kv = pair()
    r1 = _req("r1", 26)
    ids1 = list(range(7))
    _admit(s, r1, ids1)
    _step(s, w, r1, ids1, 0)
    # The worker lost a block the scheduler still believes is held (e.g. a slot shortage).
    w._worker.executor.evict_host([w._worker._key(r1.block_hashes[2])])
    r2 = _req("r2", 26)
    ids2 = list(range(10, 17))
    n = _admit(s, r2, ids2)
    assert n == 24
    _meta, errs = _step(s, w, r2, ids2, 24)
    assert errs == {12}


def test_remote_hit_promotes_into_host(pair):
    fc = FakeClient()
    s_a, w_a, kv_a = pair(remote=fc)
    r = _req("r1", 18)
    _admit(s_a, r, [0, 1, 2, 3, 4])
    _step(s_a, w_a, r, [0, 1, 2, 3, 4], 0)
    assert w_a._worker.remote.drain(5) and len(fc.data) == 4
    # A fresh instance (empty host tier) with the same identity.
    s_b, w_b, kv_b = pair(remote=fc)
    for name in kv_b:
        kv_b[name][0:5] = kv_a[name][0:5]  # only to compare bytes below
        kv_b[name][20:25].zero_()
    r2 = _req("r2", 18)
    assert _admit(s_b, r2, [20, 21, 22, 23, 24]) == 16
    meta, errs = _step(s_b, w_b, r2, [20, 21, 22, 23, 24], 16)
    assert not errs and meta.loads["r2"].from_remote == [True] * 4
    assert _same(kv_b, [0, 1, 2, 3], [20, 21, 22, 23])
    assert len(w_b._worker.executor.store_) == 4  # promoted
    # The next identical prompt comes from the host tier, no remote read.
    fc.data.clear()
    r3 = _req("r3", 18)
    assert _admit(s_b, r3, [25, 26, 27, 28, 29]) == 16
    meta, errs = _step(s_b, w_b, r3, [25, 26, 27, 28, 29], 16)
    assert not errs and meta.loads["r3"].from_remote == [False] * 4


def test_remote_miss_after_lookup_is_a_load_error(pair):
    fc = FakeClient()
    s, w, _kv = pair(cpu_cache=0, remote=fc)
    r = _req("r1", 18)
    for h in r.block_hashes:
        fc.data[w._worker._key(h)] = b"\0" * 10  # present at lookup ...
    assert _admit(s, r, [0, 1, 2, 3, 4]) == 16
    fc.data.clear()  # ... evicted before the load (eviction race)
    _meta, errs = _step(s, w, r, [0, 1, 2, 3, 4], 16)
    assert errs == {0, 1, 2, 3}


@pytest.fixture
def spans():
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from membrain import tracing

    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    tracing.configure(provider)
    yield exp
    tracing.configure(None)


def test_spans_for_lookup_load_and_store(pair, spans):
    fc = FakeClient()
    s_a, w_a, _ = pair(remote=fc)
    r = _req("r1", 18)
    _admit(s_a, r, [0, 1, 2, 3, 4])
    _step(s_a, w_a, r, [0, 1, 2, 3, 4], 0)
    assert w_a._worker.remote.drain(5)
    s_b, w_b, _ = pair(remote=fc)
    r2 = _req("r2", 18)
    assert _admit(s_b, r2, [20, 21, 22, 23, 24]) == 16
    _step(s_b, w_b, r2, [20, 21, 22, 23, 24], 16)
    got = [
        (x.name, {k.removeprefix("membrain."): v for k, v in x.attributes.items()})
        for x in spans.get_finished_spans()
    ]
    names = [n for n, _ in got]
    assert (
        names.count("membrain.lookup") == 2 and "membrain.store" in names and "membrain.store.remote" in names
    )
    lookups = [a for n, a in got if n == "membrain.lookup"]
    assert lookups[0]["outcome"] == "miss" and lookups[1]["outcome"] == "hit"
    load = next(a for n, a in got if n == "membrain.load")
    assert load["outcome"] == "ok" and load["blocks.remote"] == 4 and load["bytes"] > 0
    remote = next(a for n, a in got if n == "membrain.store.remote")
    assert remote["outcome"] == "ok" and remote["blocks.remote"] == 4


# ---------------------------------------------------------------- never block the engine


def _stored_remotely(pair, fc, n_tokens: int = 18):
    """Instance A computes and stores a prompt into the fake remote; returns A's KV."""
    s_a, w_a, kv_a = pair(remote=fc)
    r = _req("a", n_tokens)
    ids = list(range(n_tokens // BS + 1))
    _admit(s_a, r, ids)
    _step(s_a, w_a, r, ids, 0)
    assert w_a._worker.remote.drain(5) and len(fc.data) == n_tokens // BS
    return kv_a


def _alloc(s, req, ids, n):
    s.update_state_after_alloc(req, NS(get_block_ids=lambda: (ids,)), n)


def _start(s, w, ids):
    """A step that schedules nothing but carries the loads planned at allocation (vLLM's step
    in which an async-loading request is admitted)."""
    s._scheduler.kv_cache_manager = NS(get_block_ids=lambda rid: (ids,))
    so = NS(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
        num_scheduled_tokens={},
    )
    meta = s.build_connector_meta(so)
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    w.wait_for_save()
    return meta


def test_async_lookup_answers_none_until_the_remote_answers(pair):
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, _w, _kv = pair(remote=fc)
    fc.gate = threading.Event()  # the remote is slow
    r = _req("r", 18)
    t0 = time.monotonic()
    assert s.get_num_new_matched_tokens(r, 0) == (None, False)  # ask again
    assert s.get_num_new_matched_tokens(r, 0) == (None, False)  # still in flight: one lookup
    assert time.monotonic() - t0 < 0.5, "the scheduler waited on the network"
    fc.gate.set()
    assert _matched(s, r) == (16, True)
    assert fc.lookups == 1 + 1  # A's own miss, then exactly one for r
    # The answer is kept while the request waits; request_finished drops it.
    assert s.get_num_new_matched_tokens(r, 0) == (16, True) and fc.lookups == 2
    s.request_finished(r, [])
    assert "r" not in s._scheduler._reqs
    # No remote: immediate answers (a miss here; host hits are immediate too, see below).
    s2, _w2, _ = pair()
    assert s2.get_num_new_matched_tokens(_req("x", 18), 0) == (0, False)


def test_a_lookup_over_its_budget_admits_the_request_without_the_remote(pair):
    """A hung or overloaded server costs a new request at most lookup_budget_ms: then it is
    admitted with what the host tier holds (here nothing) and the late answer is dropped."""
    import dataclasses

    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, _w, _kv = pair(remote=fc)
    sched = s._scheduler
    sched.settings = dataclasses.replace(sched.settings, lookup_budget_ms=50)
    fc.gate = threading.Event()  # the remote does not answer
    r = _req("r", 18)
    assert s.get_num_new_matched_tokens(r, 0) == (None, False)
    time.sleep(0.03)
    assert s.get_num_new_matched_tokens(r, 0) == (None, False)  # within its budget: ask again
    time.sleep(0.05)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)  # over it: computed, not waited for
    fc.gate.set()
    time.sleep(0.02)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)  # the late answer changes nothing
    assert fc.lookups == 2  # A's own miss, then one for r
    assert sched.take_stats().data["lookups_over_budget"] == 1
    # An answer that came in time counts even when the scheduler asks after the budget (a long
    # step in between): the budget bounds waiting, not answers.
    r2 = _req("r2", 18)
    assert s.get_num_new_matched_tokens(r2, 0) == (None, False)
    time.sleep(0.1)
    assert s.get_num_new_matched_tokens(r2, 0) == (16, True)


def test_host_hit_answers_at_once_even_with_a_slow_remote(pair):
    fc = FakeClient()
    s, w, _kv = pair(remote=fc)
    r1 = _req("r1", 18)
    _admit(s, r1, [0, 1, 2, 3, 4])
    _step(s, w, r1, [0, 1, 2, 3, 4], 0)
    fc.gate = threading.Event()
    # Every block the request can load is in the host tier: no remote round trip.
    assert s.get_num_new_matched_tokens(_req("r2", 18), 0) == (16, True)
    fc.gate.set()


def test_async_remote_load_completes_through_get_finished_byte_exact(pair):
    fc = FakeClient()
    kv_a = _stored_remotely(pair, fc)
    s, w, kv = pair(remote=fc)
    for name in kv:
        kv[name][0:5] = kv_a[name][0:5]  # only to compare bytes below
        kv[name][20:25].zero_()
    r = _req("r", 18)
    ids = [20, 21, 22, 23, 24]
    assert _matched(s, r) == (16, True)
    _alloc(s, r, ids, 16)
    fc.gate = threading.Event()  # the fetch hangs until released
    t0 = time.monotonic()
    meta = _start(s, w, ids)
    assert time.monotonic() - t0 < 0.5, "start_load_kv waited on the network"
    assert meta.loads["r"].from_remote == [True] * 4
    assert w.get_finished(set()) == (None, None) and not w.get_block_ids_with_load_errors()
    fc.gate.set()
    assert _finish_loads(w, {"r"}) == set()
    assert _same(kv, [0, 1, 2, 3], [20, 21, 22, 23])
    assert fc.timeouts[-1] == 2000  # 4 small blocks: the base deadline
    stats = w.get_kv_connector_stats()
    assert stats is not None and stats.data["load_tokens_remote"] == 16 and stats.data["loads"] == 1


def test_host_tier_hits_load_asynchronously_too(pair):
    s, w, kv = pair()
    r1 = _req("r1", 18)
    _admit(s, r1, [0, 1, 2, 3, 4])
    _step(s, w, r1, [0, 1, 2, 3, 4], 0)
    r2 = _req("r2", 18)
    assert _matched(s, r2) == (16, True)
    _alloc(s, r2, [10, 11, 12, 13, 14], 16)
    meta = _start(s, w, [10, 11, 12, 13, 14])
    assert meta.loads["r2"].from_remote == [False] * 4
    assert _finish_loads(w, {"r2"}) == set()
    assert _same(kv, [0, 1, 2, 3], [10, 11, 12, 13])


def test_remote_miss_during_async_load_is_reported_with_the_completion(pair):
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, _kv = pair(cpu_cache=0, remote=fc)
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    ids = [20, 21, 22, 23, 24]
    _alloc(s, r, ids, 16)
    del fc.data[w._worker._key(r.block_hashes[2])]  # evicted after the lookup
    _start(s, w, ids)
    # The failed block comes in the same (get_finished, get_block_ids_with_load_errors) pair
    # that reports the request finished -- never after it.
    deadline = time.monotonic() + 10
    while True:
        _, recving = w.get_finished(set())
        errs = w.get_block_ids_with_load_errors()
        if recving:
            assert recving == {"r"} and errs == {22}
            break
        assert not errs and time.monotonic() < deadline
        time.sleep(0.001)


def test_abort_during_in_flight_load_releases_slots_and_is_reported(pair):
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, kv = pair(cpu_cache=0, remote=fc)
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    ids = [20, 21, 22, 23, 24]
    for t in kv.values():
        t[20:25].zero_()
    _alloc(s, r, ids, 16)
    fc.gate = threading.Event()
    _start(s, w, ids)
    pool = w._worker.executor.store_.pool
    # vLLM aborts the request while it waits in WAITING_FOR_REMOTE_KVS: the scheduler half
    # keeps nothing and asks for no delayed free (vLLM itself waits for finished_recving) ...
    assert s.request_finished(r, ids) == (False, None) and "r" not in s._scheduler._reqs
    # ... and the workers learn it from finished_req_ids; the load is still in flight.
    assert w.get_finished({"r"}) == (None, None)
    fc.gate.set()
    _finish_loads(w, {"r"})  # still reported, so vLLM frees the blocks
    assert all(not t[20:24].any() for t in kv.values()), "an aborted load wrote into freed blocks"
    assert w._worker.executor.loads_in_flight == 0
    assert not w._worker.executor.store_  # nothing promoted or held
    assert pool.free_slots == pool.num_slots, (pool.free_slots, pool.num_slots)


def test_load_deadline_scales_with_the_bytes_asked(pair):
    from membrain.tiers.remote import PER_MIB_MS, deadline_ms

    assert deadline_ms(500, 0) == deadline_ms(500, 1 << 20) == 500
    assert deadline_ms(500, (1 << 20) + 1) == 500 + PER_MIB_MS
    assert deadline_ms(500, 64 << 20) == 500 + 63 * PER_MIB_MS
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, _kv = pair(remote=fc)
    w._worker.executor.fetch_chunk_blocks = 4
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    _alloc(s, r, [20, 21, 22, 23, 24], 16)
    _start(s, w, [20, 21, 22, 23, 24])
    _finish_loads(w, {"r"})
    bb = w._worker.executor.block_bytes
    # each fetch shares the link with the other streams of the load: their bytes count too
    assert fc.timeouts[-1] == deadline_ms(2000, 4 * bb * w._worker.executor.fetch_streams)
    # A long prefix gets the time its bytes need (stores too).
    w._worker.remote.get_into([b"k"], [bytearray(4)], nbytes=64 << 20)
    assert fc.timeouts[-1] == 2000 + 63 * PER_MIB_MS
    w._worker.remote.put_async([b"k"], [b"v"], nbytes=16 << 20)
    assert fc.timeouts[-1] == 2000 + 15 * PER_MIB_MS


def test_loads_of_one_step_are_one_batched_fetch_in_pipelined_chunks(pair):
    fc = FakeClient()
    kv_a = _stored_remotely(pair, fc)
    s, w, kv = pair(cpu_cache=0, remote=fc)
    calls: list[int] = []
    real = fc.get_into

    def counting(keys, bufs, timeout_ms=None):
        calls.append(len(keys))
        return real(keys, bufs, timeout_ms)

    fc.get_into = counting
    for name in kv:
        kv[name][0:5] = kv_a[name][0:5]
        kv[name][10:20].zero_()
    r1, r2 = _req("r1", 18), _req("r2", 18)  # the same prompt twice, admitted in one step
    assert _matched(s, r1) == (16, True) and _matched(s, r2) == (16, True)
    _alloc(s, r1, [10, 11, 12, 13, 14], 16)
    _alloc(s, r2, [15, 16, 17, 18, 19], 16)
    _start(s, w, [])
    assert _finish_loads(w, {"r1", "r2"}) == set()
    assert calls == [8], "both requests' blocks should travel in one fetch"
    assert _same(kv, [0, 1, 2, 3, 0, 1, 2, 3], [10, 11, 12, 13, 15, 16, 17, 18])
    # Smaller chunks: several fetches, each scatter overlapping the next fetch; same bytes.
    calls.clear()
    w._worker.executor.fetch_chunk_blocks = 3
    for t in kv.values():
        t[20:25].zero_()
    r3 = _req("r3", 18)
    assert _matched(s, r3) == (16, True)
    _alloc(s, r3, [20, 21, 22, 23, 24], 16)
    _start(s, w, [])
    assert _finish_loads(w, {"r3"}) == set()
    # (the chunks are fetched in parallel streams: in either order)
    assert sorted(calls) == [1, 3] and _same(kv, [0, 1, 2, 3], [20, 21, 22, 23])


def _count_concurrent_fetches(fc, inside) -> list[int]:
    """Wraps ``fc.get_into``: ``inside(n)`` runs within the n-th call (from 1); the returned
    list holds the most calls in flight at once."""
    active, most, calls = [0], [0], [0]
    lock = threading.Lock()
    real = fc.get_into

    def counting(keys, bufs, timeout_ms=None):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            calls[0] += 1
            n = calls[0]
        try:
            inside(n)
            return real(keys, bufs, timeout_ms)
        finally:
            with lock:
                active[0] -= 1

    fc.get_into = counting
    return most


def test_a_load_fetches_its_chunks_in_parallel_streams(pair):
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, kv = pair(cpu_cache=0, remote=fc)
    ex = w._worker.executor
    ex.fetch_chunk_blocks = 1
    assert ex.fetch_streams == 3
    # The first three one-block fetches must be in flight together: each waits at the barrier
    # until all three arrived (a serial fetcher breaks it after the timeout).
    together = threading.Barrier(ex.fetch_streams, timeout=10)

    def meet(n: int) -> None:
        if n <= together.parties:
            try:
                together.wait()
            except threading.BrokenBarrierError:
                pass

    most = _count_concurrent_fetches(fc, meet)
    for t in kv.values():
        t[20:25].zero_()
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    _alloc(s, r, [20, 21, 22, 23, 24], 16)
    _start(s, w, [])
    assert _finish_loads(w, {"r"}) == set()
    assert not together.broken, "the first fetches of a load did not run in parallel"
    assert most[0] == ex.fetch_streams, most  # and never more than fetch_streams at once
    assert _same(kv, [0, 1, 2, 3], [20, 21, 22, 23])


def test_a_load_counts_the_page_faults_of_its_fetch_threads(pair):
    """Page faults on the load path are counted per load (stats, Prometheus, the load's log
    line): a fetch that first-touches 1024 fresh 4 KiB pages shows at least that many."""
    import mmap

    pages = 1024
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, _kv = pair(cpu_cache=0, remote=fc)

    def touch_fresh_pages(n: int) -> None:
        if n == 1:
            m = mmap.mmap(-1, pages * 4096)
            m.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page, whatever THP says
            for off in range(0, pages * 4096, 4096):
                m[off] = 1
            m.close()

    _count_concurrent_fetches(fc, touch_fresh_pages)
    w.get_kv_connector_stats()  # drop what the stores counted
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    _alloc(s, r, [20, 21, 22, 23, 24], 16)
    _start(s, w, [])
    assert _finish_loads(w, {"r"}) == set()
    stats = w.get_kv_connector_stats()
    assert stats is not None and stats.data["loads"] == 1
    assert stats.data["load_page_faults_fetch"] >= pages, stats.data
    assert stats.data["load_page_faults_fetch"] < 50 * pages  # the thread's own, not the process's


def test_the_worker_backs_its_host_tier_at_start_up(pair):
    """register_kv_caches creates the host tier's slots (capacity as the scheduler sizes it,
    plus staging headroom) and prefaults them, so no load pays their first touch."""
    s, w, _kv = pair(cpu_cache=1 << 20)
    ex = w._worker.executor
    assert ex is not None and ex.store_ is not None
    assert ex.store_.capacity == s._scheduler.host_capacity > 0
    if ex.store_.prefaulted_bytes == 0:
        pytest.skip("kernel without MADV_POPULATE_WRITE (Linux < 5.14)")
    pool = ex.store_.pool
    assert pool.num_slots == ex.store_.capacity + staging_blocks(
        pool.slot_bytes, ex.remote is not None, ex.max_inflight
    )
    assert ex.store_.prefaulted_bytes >= pool.num_slots * pool.slot_bytes  # every slot
    w.shutdown()


def test_an_idle_step_waits_for_a_load_and_a_busy_step_never_does(pair, monkeypatch):
    from membrain.vllm import worker as worker_mod

    monkeypatch.setattr(worker_mod, "IDLE_STEP_WAIT_S", 5.0)
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, _kv = pair(cpu_cache=0, remote=fc)
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    _alloc(s, r, [20, 21, 22, 23, 24], 16)
    fc.gate = threading.Event()  # the fetch waits for it
    meta = _start(s, w, [])  # a step that schedules nothing: vLLM's engine loop spinning
    assert meta.idle_step
    # A step with work never waits, even with a load in flight.
    t0 = time.monotonic()
    assert w._worker.get_finished(set(), idle_step=False) == set()
    assert time.monotonic() - t0 < 1.0
    # An idle step waits for the load, and returns as soon as it finished (not at the timeout).
    threading.Timer(0.2, fc.gate.set).start()
    t0 = time.monotonic()
    _sending, recving = w.get_finished(set())
    waited = time.monotonic() - t0
    assert recving == {"r"} and 0.15 < waited < 4.0, (recving, waited)
    assert w.get_block_ids_with_load_errors() == set()


def test_the_step_metadata_says_whether_anything_is_scheduled(pair):
    s, _w, _kv = pair()
    idle = NS(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
        num_scheduled_tokens={},
        total_num_scheduled_tokens=0,
    )
    s._scheduler.kv_cache_manager = NS(get_block_ids=lambda rid: ([],))
    assert s.build_connector_meta(idle).idle_step
    busy = NS(**{**vars(idle), "total_num_scheduled_tokens": 1})
    assert not s.build_connector_meta(busy).idle_step


def test_a_load_beside_running_requests_fetches_one_chunk_at_a_time(pair, monkeypatch):
    """... and scatters on the (niced) loader thread alone: the shared copy pool runs at the
    engine's priority and is what the step's own gathers wait for."""
    from membrain import ops

    scatter, copy_threads = ops.scatter_blocks, []

    def recording_scatter(*args, threads: int = 0, **kwargs):
        copy_threads.append(threads)
        return scatter(*args, threads=threads, **kwargs)

    monkeypatch.setattr(ops, "scatter_blocks", recording_scatter)
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, kv = pair(cpu_cache=0, remote=fc)
    w._worker.executor.fetch_chunk_blocks = 1
    # long enough for a second stream to overlap, were there one
    most = _count_concurrent_fetches(fc, lambda _n: time.sleep(0.05))
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    _alloc(s, r, [20, 21, 22, 23, 24], 16)
    s._scheduler.kv_cache_manager = NS(get_block_ids=lambda rid: ([],))
    busy = NS(  # the step also decodes another request
        scheduled_new_reqs=[],
        scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
        num_scheduled_tokens={"other": 1},
    )
    meta = s.build_connector_meta(busy)
    assert not meta.idle_step and "r" in meta.loads
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    assert _finish_loads(w, {"r"}) == set()
    assert most[0] == 1, most
    assert _same(kv, [0, 1, 2, 3], [20, 21, 22, 23])
    assert copy_threads == [1] * 4


def test_fetch_chunks_are_sized_in_bytes():
    from membrain.tiers.executor import FETCH_CHUNK_BLOCKS, FETCH_CHUNK_BYTES, fetch_chunk_blocks

    assert fetch_chunk_blocks(64 << 10) == FETCH_CHUNK_BLOCKS  # small blocks: the block cap
    assert fetch_chunk_blocks(8 << 20) == FETCH_CHUNK_BYTES // (8 << 20)  # a wide model's block
    assert fetch_chunk_blocks(FETCH_CHUNK_BYTES * 2) == 1


def test_eviction_during_a_load_cancels_its_promotion(pair):
    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, w, _kv = pair(remote=fc)
    r = _req("r", 18)
    assert _matched(s, r) == (16, True)
    _alloc(s, r, [20, 21, 22, 23, 24], 16)
    fc.gate = threading.Event()
    meta = _start(s, w, [20, 21, 22, 23, 24])
    assert meta.loads["r"].promote == [True] * 4
    # The scheduler evicts one of them (a later step) before the load lands.
    w._worker.executor.evict_host([w._worker._key(r.block_hashes[1])])
    fc.gate.set()
    assert _finish_loads(w, {"r"}) == set()
    held = set(w._worker.executor.store_.keys())
    assert held == {w._worker._key(r.block_hashes[i]) for i in (0, 2, 3)}


def test_async_lookup_answer_is_reconciled_with_host_tier_changes(pair):
    """The remote answer is kept as the block range the remote holds: a host tier that gains
    blocks meanwhile needs no new round trip; one that loses blocks below it asks again."""
    from membrain.vllm.scheduler import _ReqState

    fc = FakeClient()
    _stored_remotely(pair, fc)
    s, _w, _kv = pair(remote=fc)
    sched = s._scheduler
    r = _req("r", 18)
    hashes = sched._hashes(r, 4)
    st = _ReqState(r)
    sched.tiers.host.discard(hashes)
    assert sched._match(st, hashes, 0) is None  # lookup of [0, 4) started
    st.lookup.result(5)
    sched.tiers.host.admit(hashes[:2])  # the host tier gained blocks 0-1 meanwhile
    m = sched._match(st, hashes, 0)
    assert (m.local, m.host_end, m.remote_end) == (0, 2, 4) and fc.lookups == 2  # A's + this one
    # The remote answer covers [2, 4) only after a lookup from 2 ...
    st2 = _ReqState(r)
    assert sched._match(st2, hashes, 0) is None and st2.lookup_from == 2
    st2.lookup.result(5)
    assert sched._match(st2, hashes, 0).remote_end == 4
    # ... so when the host tier loses block 1 the gap [1, 2) is asked about, not assumed.
    sched.tiers.host.discard(hashes[1:2])
    st2.match = None
    assert sched._match(st2, hashes, 0) is None and st2.lookup_from == 1
    st2.lookup.result(5)
    m = sched._match(st2, hashes, 0)
    assert (m.host_end, m.remote_end) == (1, 4)


def test_every_tp_rank_reports_its_own_completion(pair, monkeypatch):
    """vLLM counts finished_recving per worker (KVOutputAggregator): each rank reports the
    requests it loaded, whatever the others do -- also a rank that cannot load at all."""
    s, w0, _kv = pair()
    r1 = _req("r1", 18)
    _admit(s, r1, [0, 1, 2, 3, 4])
    _step(s, w0, r1, [0, 1, 2, 3, 4], 0)
    r2 = _req("r2", 18)
    assert _matched(s, r2) == (16, True)
    _alloc(s, r2, [10, 11, 12, 13, 14], 16)
    meta = _start(s, w0, [10, 11, 12, 13, 14])
    import vllm.distributed.parallel_state as ps
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from membrain.vllm.connector import MembrainConnector

    monkeypatch.setattr(ps, "get_tp_group", lambda: NS(rank_in_group=1))
    w1 = MembrainConnector(s._vllm_config, KVConnectorRole.WORKER, s._kv_cache_config)
    w1.register_kv_caches({})  # rank 1 cannot use its tensors: its load fails but still reports
    w1.bind_connector_metadata(meta)
    w1.start_load_kv(None)
    assert _finish_loads(w0, {"r2"}) == set()
    assert _finish_loads(w1, {"r2"}) == {10, 11, 12, 13}
