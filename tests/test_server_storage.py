"""Capacity, LRU eviction, TTL and pinning, seen through the protocol."""

from __future__ import annotations

import os
import threading
import time

from wire import GET, NO_SPACE, OK, WireClient, keys_frame, parse_get


def test_stored_bytes_never_exceed_capacity(make_server):
    s = make_server(capacity="8MiB")
    cap = s.stats()["capacity_bytes"]
    assert cap <= 8 << 20
    with WireClient(s.port) as c:
        for i in range(60):
            size = [1000, 70000, 300000, 1 << 20][i % 4]
            st = c.put([(b"k%d" % i, os.urandom(size))])
            assert st == [OK]
            stats = s.stats()
            assert stats["used_bytes"] <= cap and stats["allocated_bytes"] <= cap
        assert s.stats()["evictions"] > 0


def test_lru_order(make_server):
    # 5 slabs: the objects' bookkeeping is charged against capacity and borrows one whole slab.
    s = make_server(capacity="5MiB", slab_bytes=1 << 20)
    val = b"v" * (256 << 10)  # 16 fit
    with WireClient(s.port) as c:
        for i in range(16):
            c.put([(b"k%d" % i, val)])
        assert s.stats()["evictions"] == 0
        c.get([b"k0", b"k1"])  # now most recent
        for i in range(16, 20):
            c.put([(b"k%d" % i, val)])
        got = c.exists([b"k%d" % i for i in range(20)])
        present = {i for i, st in enumerate(got) if st == OK}
        assert {0, 1} <= present
        assert not {2, 3, 4, 5} & present  # the four least recently used went first
        assert set(range(6, 20)) <= present
        assert s.stats()["evictions"] == 4


def test_mixed_sizes_move_memory_between_classes(make_server):
    s = make_server(capacity="4MiB", slab_bytes=256 << 10)
    with WireClient(s.port) as c:
        for i in range(200):  # fill with small values
            c.put([(b"s%d" % i, os.urandom(20000))])
        for i in range(8):  # then big ones: slabs must come back from the small class
            assert c.put([(b"b%d" % i, os.urandom(400000))]) == [OK]
        assert c.get([b"b7"])[0] is not None
        assert s.stats()["used_bytes"] <= 4 << 20


def test_full_cache_gives_slabs_to_a_new_size_class(make_server):
    # Slab calcification: a cache full of old 1 MiB values must hand slabs to a new 16 KiB
    # working set that is more recent, instead of letting the small class evict its own newest.
    s = make_server(capacity="64MiB")
    cap = s.stats()["capacity_bytes"]
    big = os.urandom(1 << 20)
    small = os.urandom(16 << 10)
    sets = [[b"set%d-%d" % (j, i) for i in range(64)] for j in range(8)]
    with WireClient(s.port) as c:
        for i in range(100):
            assert c.put([(b"big%d" % i, big)]) == [OK]
            assert s.stats()["used_bytes"] <= cap
        for _ in range(3):
            for keys in sets:
                assert c.put([(k, small) for k in keys]) == [OK] * len(keys)
                st = s.stats()
                assert st["used_bytes"] <= cap and st["allocated_bytes"] <= cap
        for keys in sets:
            got = c.get(keys)
            assert sum(v is None for v in got) == 0
            assert all(v == small for v in got)
        st = s.stats()
        assert st["slab_reassignments"] >= 8
        assert st["used_bytes"] <= cap and st["allocated_bytes"] <= cap


def test_ttl_expiry_lazy_and_swept(make_server):
    s = make_server(ttl=0.5)
    with WireClient(s.port) as c:
        c.put([(b"a", b"1" * 1000), (b"b", b"2" * 1000)])
        assert c.get([b"a"]) == [b"1" * 1000]
        time.sleep(0.8)
        assert c.get([b"a"]) == [None]  # lazy, on access
        deadline = time.time() + 3
        while s.stats()["items"] and time.time() < deadline:  # b: the periodic sweep
            time.sleep(0.1)
        st = s.stats()
        assert st["items"] == 0 and st["used_bytes"] == 0 and st["expired"] == 2


def test_pinned_value_survives_overwrite_and_eviction(make_server):
    """A GET reply that is still being sent keeps its bytes even when the key is replaced."""
    # Small socket buffers so the 3 MiB reply cannot vanish into the kernel at once.
    s = make_server(capacity="8MiB", slab_bytes=1 << 20, socket_buffer_bytes=65536)
    v1 = os.urandom(3 << 20)
    with WireClient(s.port) as reader, WireClient(s.port) as writer:
        reader.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536)
        writer.put([(b"hot", v1)])
        reader.send(keys_frame(GET, [b"hot"], rid=1))  # reply is queued; we do not read yet
        time.sleep(0.2)
        for i in range(6):  # overwrite and churn the whole capacity meanwhile
            st = writer.put([(b"hot" if i == 0 else b"f%d" % i, os.urandom(3 << 20))])
            assert st[0] in (OK, NO_SPACE)
        f = reader.recv_frame()
        assert parse_get(f.payload, 1) == [v1]
        assert s.stats()["allocated_bytes"] <= s.stats()["capacity_bytes"]


def test_everything_pinned_gives_no_space(make_server):
    s = make_server(capacity="2MiB", slab_bytes=1 << 20, socket_buffer_bytes=65536)
    with WireClient(s.port) as c, WireClient(s.port) as r:
        r.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536)
        assert c.put([(b"a", os.urandom(1 << 20)), (b"b", os.urandom(1 << 20))]) == [OK, OK]
        r.send(keys_frame(GET, [b"a", b"b"], rid=1))
        time.sleep(0.2)
        assert c.put([(b"c", os.urandom(1 << 20))]) == [NO_SPACE]
        assert len(parse_get(r.recv_frame().payload, 2)) == 2
        assert c.put([(b"c", os.urandom(1 << 20))]) == [OK]  # unpinned: evictable again


def test_concurrent_readers_writers_same_keys(make_server):
    """Overwrites race with readers: every GET returns some complete version, never a torn one."""
    s = make_server(capacity="16MiB", threads=2)
    versions = {i: bytes([i]) * (200000 + i) for i in range(8)}
    errors: list[str] = []
    stop = threading.Event()

    def writer():
        with WireClient(s.port) as c:
            i = 0
            while not stop.is_set():
                c.put([(b"shared", versions[i % 8])])
                i += 1

    def reader():
        with WireClient(s.port) as c:
            while not stop.is_set():
                v = c.get([b"shared"])[0]  # wire.parse_get verifies the checksum
                if v is not None and v not in versions.values():
                    errors.append("torn value")

    ts = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in ts:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in ts:
        t.join()
    assert not errors


def test_prefault_backs_capacity_without_touching_live_values(make_server):
    s = make_server(capacity="256MiB")
    cap = s.stats()["capacity_bytes"]
    values = {b"early%d" % i: os.urandom(1 << 20) for i in range(32)}
    with WireClient(s.port) as c:
        # Written while the background prefault is still populating the region.
        assert c.put(list(values.items())) == [OK] * len(values)
        deadline = time.monotonic() + 60
        while s.stats()["prefaulted_bytes"] < cap:
            assert time.monotonic() < deadline, "prefault did not finish within 60 s"
            time.sleep(0.05)
        assert c.get(list(values)) == list(values.values())


def test_no_prefault_leaves_memory_lazy(make_server):
    s = make_server(capacity="64MiB", prefault=False)
    time.sleep(0.3)
    assert s.stats()["prefaulted_bytes"] == 0


def test_mixed_sizes_fill_capacity_and_evict_by_recency(make_server):
    # Values of 1 B, 4 KiB, 64 KiB, 1 MiB and 3,000,001 B mixed into 256 MiB: 40 of 215 items were
    # already evicted at 75 % of capacity (3 MB values took a 4 MiB slab each, and every class
    # held a part-filled 4 MiB slab). Now nothing is evicted before 90 % of capacity holds live
    # bytes, and what goes is the least recent, whatever its size.
    import random

    s = make_server(capacity="256MiB", prefault=False, threads=1)
    cap = s.stats()["capacity_bytes"]
    sizes = [1, 4096, 65536, 1 << 20, 3_000_001]
    blobs = {n: os.urandom(n) for n in sizes}
    rng = random.Random(7)
    written: list[tuple[bytes, int]] = []
    first_eviction_live = None
    with WireClient(s.port) as c:
        while sum(n for _, n in written) < 2 * cap:
            n = rng.choice(sizes)
            key = b"m%d" % len(written)
            assert c.put([(key, blobs[n])]) == [OK]
            written.append((key, n))
            if first_eviction_live is None and s.stats()["evictions"]:
                first_eviction_live = (sum(m for _, m in written[:-1]), s.stats()["used_bytes"])
        assert first_eviction_live is not None
        before, _ = first_eviction_live
        assert before >= 0.9 * cap, f"first eviction with {before / cap:.1%} of capacity live"
        # Recency: everything written in the last 70 % of capacity is still there.
        recent, total = [], 0
        for key, n in reversed(written):
            total += n
            if total > 0.7 * cap:
                break
            recent.append(key)
        got = c.exists(recent)
        assert got == [OK] * len(recent), f"{got.count(OK)} of {len(recent)} recent items present"
        st = s.stats()
        assert st["used_bytes"] >= 0.85 * cap and st["allocated_bytes"] <= cap
