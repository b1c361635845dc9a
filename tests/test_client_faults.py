"""Failure handling against real server subprocesses: kills, hangs, restarts, several servers,
replicas, circuit breaking, and corrupt replies."""

from __future__ import annotations

import os
import threading
import time

import pytest

import membrain
from membrain import _native
from membrain.utils.net import free_port

SLACK_S = 0.5  # scheduling slack on a loaded 2-core machine


def _timed(fn, *args, **kw):
    t0 = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - t0


def test_server_killed_mid_stream_then_restarted(server) -> None:
    timeout_ms = 800
    c = membrain.Client(server.endpoint, timeout_ms=timeout_ms, breaker_base_s=0.05, breaker_max_s=0.2)
    vals = [os.urandom(4 << 20) for _ in range(4)]
    keys = [f"big{i}" for i in range(4)]
    assert all(c.put(keys, vals))
    stop = threading.Event()
    worst = [0.0]
    errors: list[BaseException] = []
    results: list[bool] = []

    def stream() -> None:
        bufs = [bytearray(4 << 20) for _ in range(4)]
        while not stop.is_set():
            try:
                _ok, dt = _timed(c.put, keys, vals)
                worst[0] = max(worst[0], dt)
                got, dt = _timed(c.get_into, keys, bufs)
                worst[0] = max(worst[0], dt)
                results.append(all(got))
                for g, b, v in zip(got, bufs, vals):
                    assert not g or bytes(b) == v
            except BaseException as e:
                errors.append(e)
                return

    th = threading.Thread(target=stream)
    th.start()
    time.sleep(0.5)
    server.kill()
    time.sleep(0.5)
    n_before = len(results)
    time.sleep(0.3)
    assert not errors, errors
    assert len(results) > n_before, "calls must keep returning while the server is down"
    assert not any(results[n_before:]), "a dead server must produce misses"
    server.start()  # same port
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (results and results[-1]):
        time.sleep(0.05)
    stop.set()
    th.join(10)
    assert not errors, errors
    assert worst[0] <= timeout_ms / 1000 + SLACK_S, worst[0]
    assert c.put(keys[:1], vals[:1]) == [True], "client must reconnect after a restart"
    assert c.get(keys[:1]) == vals[:1]
    c.close()


def test_hung_server_misses_within_deadline(server) -> None:
    with membrain.Client(server.endpoint, timeout_ms=300, breaker_base_s=5.0, breaker_max_s=5.0) as c:
        assert c.put(["h"], [b"v"]) == [True]
        server.pause()
        try:
            got, dt = _timed(c.get, ["h"])
            assert got == [None] and dt <= 0.3 + SLACK_S, dt
            assert c.is_down(0)
            # The breaker is open: further calls do not even wait.
            got, dt = _timed(c.get, ["h"])
            assert got == [None] and dt < 0.05
            assert c.put(["h2"], [b"v"]) == [False]
            assert c.lookup_prefix(["h"]) == 0
            assert c.exists(["h"]) == [False]
            assert c.delete(["h"]) == 0
            assert c.stats()["endpoints_up"] == 0
        finally:
            server.resume()
        assert all(v is not None for v in c.ping().values())  # a ping probe closes the breaker
        assert c.get(["h"]) == [b"v"]


def test_a_hung_server_opens_the_remote_tiers_breaker(server) -> None:
    """membrain.Client answers misses (it does not raise) once its endpoints are marked down;
    the remote tier still counts that as a failure, so requests stop paying for probes: one
    lookup waits out the deadline, the next ones are instant until the tier's backoff ends (the
    client's own breaker alone would let a probe through every 50 ms..5 s)."""
    from membrain.tiers.remote import RemoteTier

    c = membrain.Client(server.endpoint, timeout_ms=300)
    tier = RemoteTier(c, timeout_ms=300, backoff_s=2.0, max_backoff_s=2.0)
    try:
        assert c.put([b"k"], [b"v"]) == [True]
        assert tier.lookup_prefix([b"k"]) == 1 and tier.available
        server.pause()
        try:
            n, dt = _timed(tier.lookup_prefix, [b"k"])
            assert n == 0 and dt <= 0.3 + SLACK_S
            assert c.all_down and not tier.available
            time.sleep(0.1)  # past the client's first backoff (50 ms): it alone would probe now
            for _ in range(5):
                n, dt = _timed(tier.lookup_prefix, [b"k"])
                assert n == 0 and dt < 0.05, dt
            assert tier.take_breaker_counts() == (1, 5)
        finally:
            server.resume()
        deadline = time.monotonic() + 10
        while tier.lookup_prefix([b"k"]) != 1:  # the tier's probe gets through once it is due
            assert time.monotonic() < deadline, "the remote tier never recovered"
            time.sleep(0.1)
        assert tier.available and not c.all_down
    finally:
        tier.close()


def test_unreachable_endpoint_is_a_miss() -> None:
    port = free_port()
    with membrain.Client(f"tcp://127.0.0.1:{port}", timeout_ms=300) as c:
        got, dt = _timed(c.get, ["a"])
        assert got == [None] and dt < 0.3 + SLACK_S
        assert c.put(["a"], [b"x"]) == [False]
        assert c.ping()[f"tcp://127.0.0.1:{port}"] is None
    with pytest.raises(ConnectionError):
        _native.Connection("127.0.0.1", port, connect_timeout_ms=200)


def test_multi_server_placement(server_factory) -> None:
    servers = [server_factory() for _ in range(3)]
    with membrain.Client([s.endpoint for s in servers], timeout_ms=3000) as c:
        keys = [f"spread-{i}" for i in range(600)]
        vals = [k.encode() * 3 for k in keys]
        assert all(c.put(keys, vals))
        st = c.stats()
        per = [st["endpoints"][s.endpoint]["items"] for s in servers]
        assert sum(per) == 600 and min(per) > 140, per
        assert st["items"] == 600
        assert c.get(keys) == vals
        assert c.lookup_prefix(keys) == 600
        missing_at = 321
        assert c.delete([keys[missing_at]]) == 1
        assert c.lookup_prefix(keys) == missing_at
        assert c.lookup_prefix(keys[missing_at + 1 :]) == 600 - missing_at - 1
        # Each key sits on exactly its rendezvous owner.
        for k in keys[:30]:
            owner = c.owners(k)[0]
            with membrain.Client(owner) as single:
                assert single.exists([k]) == [True]


def test_replica_fallback(server_factory) -> None:
    a, b = server_factory(), server_factory()
    with membrain.Client([a.endpoint, b.endpoint], replicas=2, timeout_ms=1000) as c:
        keys = [f"rep-{i}" for i in range(100)]
        vals = [os.urandom(2000) for _ in keys]
        assert all(c.put(keys, vals))
        assert c.stats()["items"] == 200  # both copies
        a.kill()
        assert c.get(keys) == vals
        bufs = [bytearray(2000) for _ in keys]
        assert all(c.get_into(keys, bufs)) and [bytes(x) for x in bufs] == vals
        assert c.exists(keys) == [True] * 100
        assert c.lookup_prefix(keys) == 100
        # A miss on the first replica also falls back: restart a empty.
        a.start()
        time.sleep(0.3)  # let the breaker's backoff pass so a is probed again
        assert c.get(keys) == vals


def test_circuit_breaker_backoff_and_recovery(server_factory) -> None:
    a = server_factory()
    with membrain.Client(a.endpoint, timeout_ms=500, breaker_base_s=1.0, breaker_max_s=4.0) as c:
        assert c.put(["cb"], [b"1"]) == [True]
        a.kill()
        assert c.get(["cb"]) == [None]
        assert c.is_down(0)
        a.start()
        c.put(["cb"], [b"1"])  # must not be attempted during backoff
        got, dt = _timed(c.get, ["cb"])
        assert got == [None] and dt < 0.05, "down server must not be retried before its backoff"
        time.sleep(1.05)
        assert c.put(["cb"], [b"2"]) == [True], "after the backoff a probe reconnects"
        assert not c.is_down(0)
        assert c.get(["cb"]) == [b"2"]


def test_checksum_mismatch_is_a_miss() -> None:
    from fake_server import FakeServer

    bad, good = FakeServer(corrupt_gets=True), FakeServer()
    try:
        conn = _native.Connection("127.0.0.1", bad.port)
        assert conn.put([b"k", b"e"], [b"payload-bytes", b""]) == [0, 0]
        assert conn.get([b"k"]) == [None]
        buf = bytearray(13)
        assert conn.get_into([b"k", b"e"], [buf, bytearray(0)]) == [_native.STATUS_CHECKSUM_MISMATCH, 0]
        assert not conn.broken  # the stream is still in sync
        assert conn.exists([b"k"]) == [0]
        # With a replica, a corrupt value is fetched from the next one.
        with membrain.Client([bad.endpoint, good.endpoint], replicas=2) as c:
            keys = [f"c{i}" for i in range(20)]
            vals = [os.urandom(100) for _ in keys]
            assert all(c.put(keys, vals))
            assert c.get(keys) == vals
            bufs = [bytearray(100) for _ in keys]
            assert all(c.get_into(keys, bufs)) and [bytes(x) for x in bufs] == vals
    finally:
        bad.close()
        good.close()


def test_checksum_mismatch_in_first_and_last_verify_group_only() -> None:
    # The client verifies GET values group by group as they land (about 256 KiB per group).
    # Corrupting one value in the first group and one in the last must flag exactly those two:
    # verifying a group before its bytes have landed would flag the others too, and skipping a
    # group would miss one.
    from fake_server import FakeServer

    sizes = [200 << 10] * 5 + [7, 300 << 10]
    keys = [f"g{i}".encode() for i in range(len(sizes))]
    bad = FakeServer(corrupt_keys={keys[0], keys[-1]})
    try:
        conn = _native.Connection("127.0.0.1", bad.port)
        vals = [os.urandom(n) for n in sizes]
        assert conn.put(keys, vals) == [0] * len(keys)
        bufs = [bytearray(n) for n in sizes]
        mismatch = _native.STATUS_CHECKSUM_MISMATCH
        assert conn.get_into(keys, bufs) == [mismatch] + [0] * (len(keys) - 2) + [mismatch]
        assert [bytes(b) for b in bufs[1:-1]] == vals[1:-1]
        assert conn.get(keys) == [None] + vals[1:-1] + [None]
        assert not conn.broken
        assert conn.exists(keys[:2]) == [0, 0]
    finally:
        bad.close()


def test_get_lengths_that_wrap_around_break_the_connection() -> None:
    # A hostile or corrupt server claims lengths whose sum wraps around to the bytes it sent:
    # the client must refuse the reply (never allocate or place for it) and drop the stream.
    from fake_server import FakeServer

    liar = FakeServer(wrapping_get_lengths=True)
    try:
        for call in ("get", "get_into"):
            conn = _native.Connection("127.0.0.1", liar.port, timeout_ms=2000)
            with pytest.raises(ConnectionError, match="max_value_bytes"):
                if call == "get":
                    conn.get([b"a", b"b"])
                else:
                    conn.get_into([b"a", b"b"], [bytearray(64), bytearray(64)])
            assert conn.broken
        with membrain.Client(liar.endpoint, timeout_ms=2000) as c:
            assert c.get(["a", "b"]) == [None, None]
    finally:
        liar.close()


_ALLOC_FAILS_CHILD = r"""
import resource, sys
from membrain import _native
port = int(sys.argv[1])
conn = _native.Connection("127.0.0.1", port, timeout_ms=5000)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
# Room for small objects, none for the 48 MiB bytes object get() must allocate for the value.
resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), hard))
try:
    conn.get([b"huge"])
    print("no MemoryError")
except MemoryError:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print("broken" if conn.broken else "usable")
"""


def test_get_that_cannot_allocate_its_value_breaks_the_connection(make_server) -> None:
    # The 48 MiB value is still in the stream when allocating its bytes object fails: a
    # connection left usable would read it as the next reply. It must be marked broken.
    import subprocess
    import sys

    s = make_server(capacity="128MiB", slab_bytes=64 << 20)
    huge = os.urandom(48 << 20)
    with membrain.Client(f"tcp://127.0.0.1:{s.port}", timeout_ms=5000) as c:
        assert c.put(["huge"], [huge]) == [True]
    r = subprocess.run(
        [sys.executable, "-c", _ALLOC_FAILS_CHILD, str(s.port)], capture_output=True, text=True, timeout=60
    )
    assert r.stdout.strip() == "broken", (r.stdout, r.stderr[-2000:])
    with membrain.Client(f"tcp://127.0.0.1:{s.port}", timeout_ms=5000) as c:
        assert c.get(["huge"]) == [huge]


def test_key_list_ops_walk_chunks_and_refuse_short_replies() -> None:
    # EXISTS, LOOKUP_PREFIX and DELETE share one chunk walk (request_codec): statuses in order
    # across chunks, the prefix walk stopping at the first chunk that is not fully present, and
    # a reply that does not match its question breaking the connection with a message.
    from fake_server import FakeServer

    frames: list[int] = []
    srv = FakeServer(max_batch=4, on_request=frames.append)
    try:
        conn = _native.Connection("127.0.0.1", srv.port)
        keys = [f"c{i}".encode() for i in range(10)]
        assert conn.put(keys[:5], [b"v"] * 5) == [0] * 5
        frames.clear()
        assert conn.exists(keys) == [0] * 5 + [1] * 5
        assert frames == [4, 4, 4]
        frames.clear()
        assert conn.lookup_prefix(keys) == 5
        assert frames == [5, 5]  # keys 0-3 all present, 4-7 not: 8-9 are never asked
        assert conn.delete(keys) == 5
    finally:
        srv.close()

    liar = FakeServer(short_key_list_replies=True)
    try:
        for call, why in (
            (lambda c: c.exists([b"a", b"b"]), "EXISTS reply carries 1 statuses for 2 keys"),
            (lambda c: c.lookup_prefix([b"a"]), "LOOKUP_PREFIX reply is 3 bytes, expected 4"),
            (lambda c: c.delete([b"a"]), "DELETE reply is 3 bytes, expected 4"),
        ):
            conn = _native.Connection("127.0.0.1", liar.port, timeout_ms=2000)
            with pytest.raises(ConnectionError, match=f"127.0.0.1:{liar.port}: {why}"):
                call(conn)
            assert conn.broken
    finally:
        liar.close()


def test_batch_split_by_server_max_batch() -> None:
    from fake_server import FakeServer

    frames: list[int] = []
    srv = FakeServer(max_batch=7, on_request=frames.append)
    try:
        conn = _native.Connection("127.0.0.1", srv.port)
        assert conn.limits["max_batch"] == 7
        keys = [f"s{i}".encode() for i in range(30)]
        frames.clear()
        assert conn.put(keys, [b"v"] * 30) == [0] * 30
        assert frames.count(2) == 5  # ceil(30 / 7) PUT frames
        assert conn.get(keys) == [b"v"] * 30
        assert conn.lookup_prefix(keys) == 30
        assert conn.delete(keys) == 30
    finally:
        srv.close()
