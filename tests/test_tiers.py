"""Tier policy and settings, with an in-process fake client (unit tests only)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from fakes import FakeClient

from membrain import ops
from membrain.tiers.host import HostIndex, HostStore
from membrain.tiers.manager import Match, TierManager
from membrain.tiers.remote import RemoteTier
from membrain.vllm import config as mcfg
from membrain.vllm import keys as mkeys


def hs(n, tag=b"a"):
    return [tag + bytes([i]) * 31 for i in range(n)]


def test_host_index_lru_and_protect():
    idx = HostIndex(3, "lru")
    a, e = idx.admit(hs(3))
    assert len(a) == 3 and e == []
    idx.touch([hs(3)[0]])
    a, e = idx.admit(hs(1, b"b"))
    assert e == [hs(3)[2]]  # the chain's tail goes first: a block never outlives its predecessor
    assert idx.prefix_hits(hs(3)) == 2
    held = {h for h in hs(3) + hs(1, b"b") if h in idx}
    a, e = idx.admit(hs(2, b"c"), protect=held)
    assert a == [] and e == []


@pytest.mark.parametrize("policy", ["lru", "slru"])
def test_host_index_is_the_server_policy(policy):
    # Same victims as the C++ PolicyIndex the server's policies are measured with.
    from membrain import _native

    idx, ref = HostIndex(40, policy), _native.PolicyIndex(policy, 40)
    rng = random.Random(7)
    for _ in range(300):
        head = rng.randrange(20)
        chain = [bytes([head, i]) * 8 for i in range(rng.randrange(1, 12))]
        idx.admit(chain)
        ref.admit(chain)
    held = list(ref.keys())
    assert all(h in idx for h in held) and len(idx) == len(held) == len(ref)


def test_host_index_slru_keeps_reused_blocks_through_a_scan():
    idx = HostIndex(100)  # the default policy
    assert idx.policy == "slru"
    prompt = hs(4, b"p")
    idx.admit(prompt)
    idx.touch(prompt)  # re-used once
    for i in range(60):
        idx.admit(hs(5, bytes([100 + i])))  # one-off prompts: 3x the capacity
    assert idx.prefix_hits(prompt) == 4
    assert idx.evictions["protected"] == 0 and idx.evictions["probation"] > 0


def test_host_index_priority_survives_a_scan_that_evicts_everything_else():
    idx = HostIndex(10, "slru")
    system = hs(3, b"s")
    idx.admit(system, priority=1)
    for i in range(20):
        chain = hs(5, bytes([100 + i]))
        idx.admit(chain)
        idx.touch(chain)  # even re-used blocks go before the priority prefix
    assert idx.prefix_hits(system) == 3
    assert idx.evictions["priority"] == 0
    # Raising: a normal prefix touched by a high-priority request is kept the same way.
    doc = hs(3, b"d")
    idx.admit(doc)
    idx.admit(doc, priority=2)
    for i in range(20):
        idx.admit(hs(5, bytes([150 + i])))
    assert idx.prefix_hits(doc) == 3 and idx.prefix_hits(system) == 3


def test_host_index_admission_on_second_sight():
    idx = HostIndex(10, "lru", admission="seen")
    assert idx.admit(hs(2)) == ([], [])
    a, _ = idx.admit(hs(2))
    assert a == hs(2)


def test_manager_host_then_remote_and_promotion():
    fc = FakeClient()
    tm = TierManager(8, RemoteTier(fc), lambda h: b"k" + h)
    h = hs(6)
    tm.plan_store(h[:2], [10, 11])
    for x in h:
        fc.data[b"k" + x] = b"v"
    m = tm.match(h, 0, 6)
    assert m == Match(0, 2, 6) and m.host_blocks == 2 and m.remote_blocks == 4
    plan = tm.plan_load(m, h, list(range(100, 106)))
    assert plan.from_remote == [False, False, True, True, True, True]
    assert all(plan.promote[2:])
    assert tm.host.prefix_hits(h) == 6  # promoted
    # vLLM's own hit covers more than any tier: nothing to do, no round trip.
    n = fc.lookups
    assert tm.match(h, 6, 6) == Match(6, 6, 6) and fc.lookups == n


def test_manager_remote_down_is_a_miss():
    tm = TierManager(4, RemoteTier(FakeClient(fail=True)), lambda h: h)
    assert tm.match(hs(4), 0, 4) == Match(0, 0, 0)


def test_evictions_reported_once_and_readmission_cancels():
    tm = TierManager(2, None, lambda h: h)
    tm.plan_store(hs(2), [1, 2])
    tm.plan_store(hs(1, b"z"), [3])
    ev = tm.take_evictions()
    assert ev == [hs(2)[1]] and tm.take_evictions() == []  # the chain's tail first
    tm.plan_store([hs(2)[1]], [4])  # evicts hs(2)[0], re-admits hs(2)[1]
    assert tm.take_evictions() == [hs(2)[0]]


def test_host_store_roundtrip_and_remote_put_get():
    kv = [torch.randn(8, 2, 16, 8) for _ in range(3)]
    pk = ops.describe_kv_caches(kv)
    st = HostStore(pk.packed_nbytes(1), 4, 2, pin=False)
    slots = st.store(pk, [1, 5], [b"x", b"y"])
    assert all(s is not None for s in slots)
    fc = FakeClient()
    rt = RemoteTier(fc)
    done = threading.Event()
    assert rt.put_async([b"x"], [memoryview(slots[0])], lambda r: done.set())
    assert done.wait(5) and rt.inflight == 0
    ref = [t[1].clone() for t in kv]
    for t in kv:
        t[2].zero_()
        t[3].zero_()
    assert st.load(pk, [2], [b"x"]) == [True]
    assert all(torch.equal(t[2], r) for t, r in zip(kv, ref))
    buf = bytearray(pk.packed_nbytes(1))
    assert rt.get_into([b"x", b"nope"], [buf, bytearray(len(buf))]) == [True, False]
    ops.scatter_blocks(buf, pk, [3])
    assert all(torch.equal(t[3], r) for t, r in zip(kv, ref))
    assert st.load(pk, [2], [b"missing"]) == [False]
    st.evict([b"x"])
    assert b"x" not in st


def test_remote_put_backpressure_drops_instead_of_waiting():
    class Slow(FakeClient):
        def put_async(self, keys, values, timeout_ms=None):
            return Future()  # never completes

    rt = RemoteTier(Slow(), max_inflight=2)
    assert rt.put_async([b"a", b"b"], [b"1", b"2"])
    assert not rt.put_async([b"c"], [b"3"])


def test_settings_parse_and_errors():
    s = mcfg.resolve(
        {}, env={"VLLM_MEMBRAIN_ENDPOINT": "tcp://a:1,http://b:2", "VLLM_MEMBRAIN_CPU_CACHE_SIZE": "2GiB"}
    )
    assert s.endpoints == ["tcp://a:1", "http://b:2"] and s.cpu_cache_bytes == 2 << 30
    assert mcfg.parse_size("512MB") == 512 << 20 and mcfg.parse_size("1.5g") == 3 << 29
    assert 0 < mcfg.resolve({}, env={}).cpu_cache_bytes <= 4 << 30
    for bad in (
        {"endpoint": "redis://x:1,tcp://y:2"},  # Redis and Membrain endpoints do not mix
        {"endpoint": "tcp://x"},
        {"endpoint": "tcp://x:notaport"},
        {"cpu_cache_size": "lots"},
        {"remote": "maybe"},
        {"host_prefault": "sometimes"},
        {"timeout_ms": 0},
        {"namespace": "a/b"},
    ):
        with pytest.raises(mcfg.ConfigError):
            mcfg.resolve(bad, env={})
    with pytest.raises(mcfg.ConfigError):
        mcfg.resolve({}, env={"VLLM_MEMBRAIN_TYPO": "1"})
    # extra_config wins over env
    assert mcfg.resolve({"namespace": "x"}, env={"VLLM_MEMBRAIN_NAMESPACE": "y"}).namespace == "x"
    assert mcfg.resolve({}, env={}).host_prefault  # on by default
    assert not mcfg.resolve({}, env={"VLLM_MEMBRAIN_HOST_PREFAULT": "0"}).host_prefault
    assert mcfg.resolve({"host_prefault": True}, env={"VLLM_MEMBRAIN_HOST_PREFAULT": "0"}).host_prefault


def test_keys_short_and_identity_sensitive():
    k = mkeys.block_key("0" * 32, b"\xff" * 32)
    assert len(k) <= 128
    assert len(mkeys.block_key("0" * 32, b"\x01" * 200)) <= 128
    f = {"model": "m", "tp": [0, 1]}
    assert mkeys.identity_digest(f) != mkeys.identity_digest({**f, "tp": [1, 2]})


def test_circuit_breaker_skips_dead_remote():
    fc = FakeClient(fail=True)
    rt = RemoteTier(fc, backoff_s=60)
    assert rt.lookup_prefix([b"a"]) == 0 and fc.lookups == 1
    assert rt.lookup_prefix([b"a"]) == 0 and fc.lookups == 1  # skipped while backing off
    assert not rt.available
    assert rt.get_into([b"a"], [bytearray(4)]) == [False]
    # Exported to connector stats (vllm:membrain_remote_breaker_opens / _skipped_calls): one
    # opening, two calls answered without trying; counted once.
    assert rt.take_breaker_counts() == (1, 2)
    assert rt.take_breaker_counts() == (0, 0)


def test_remote_breaker_slow_success_stays_closed_and_probe_recovers():
    class SlowOk(FakeClient):
        def lookup_prefix(self, keys):
            time.sleep(0.05)  # the whole (tiny) deadline, but a success
            return super().lookup_prefix(keys)

    rt = RemoteTier(SlowOk(), timeout_ms=50, backoff_s=0.05, max_backoff_s=0.1)
    rt.lookup_prefix([b"a"])
    assert rt.available, "a slow success must not open the breaker"
    fc = FakeClient(fail=True)
    rt = RemoteTier(fc, backoff_s=0.05, max_backoff_s=0.1)
    assert rt.lookup_prefix([b"a"]) == 0 and not rt.available
    time.sleep(0.06)
    assert rt.available  # a probe is due
    fc.fail = False
    rt.lookup_prefix([b"a"])
    assert rt.available and fc.lookups == 2


def test_background_load_threads_run_at_lower_priority():
    """Loads must not slow the engine's threads: the executor's load threads are niced."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from membrain.tiers import executor

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice_of_this_thread()
    with ThreadPoolExecutor(1, initializer=executor._background_priority) as pool:
        niced = pool.submit(nice_of_this_thread).result()
    assert niced == min(19, base + executor.LOAD_THREAD_NICE)
    assert nice_of_this_thread() == base  # the calling thread keeps its priority


def test_staging_is_capped_in_bytes_but_holds_a_loads_fetch_pipeline():
    from membrain.tiers.executor import FETCH_STREAMS, HOST_HEADROOM_BYTES, fetch_chunk_blocks, staging_blocks

    mib = 1 << 20
    assert staging_blocks(768 << 10, remote=False, max_inflight=256) == 64
    assert staging_blocks(768 << 10, remote=True, max_inflight=256) == 256  # 192 MiB: under the cap
    assert staging_blocks(mib, remote=True, max_inflight=16) == 64  # the base stays
    # 8 MiB blocks (Llama-8B-like, block size 64): 512 MiB of staging, not 256 blocks = 2 GiB.
    assert staging_blocks(8 * mib, remote=True, max_inflight=256) * 8 * mib == HOST_HEADROOM_BYTES
    # Blocks so large that the cap holds fewer than one load's fetch pipeline: the pipeline wins.
    huge = 256 * mib
    assert staging_blocks(huge, remote=True, max_inflight=256) == (FETCH_STREAMS + 1) * fetch_chunk_blocks(
        huge
    )
