"""What the server holds in memory stays within --capacity plus a fixed overhead, whatever the
clients do: many tiny or empty values, PUTs that declare values and never send them."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from wire import NO_SPACE, OK, PUT, WireClient, header

from membrain.server import spawn_server

MiB = 1 << 20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sizes", [(0,), (0, 1, 17, 100)])
def test_tiny_and_empty_values_stay_within_capacity(sizes):
    # Capacity counted value bytes only: 600,000 empty values into a 1 MiB server grew its RSS
    # from 17 to 343 MiB (index entries and keys were free). Every object is now charged its
    # bookkeeping, so the index is evicted like values are.
    srv = spawn_server(capacity="1MiB", extra_args=["--no-prefault", "--log-level", "WARNING"])
    try:
        with WireClient(srv.port) as c:
            c.ping(b"warm")
            base = rss_mib(srv.pid)
            n, batch = 600_000, 1024
            for start in range(0, n, batch):
                items = [
                    (b"key-%08d" % i, b"v" * sizes[i % len(sizes)])
                    for i in range(start, min(n, start + batch))
                ]
                assert c.put(items) == [OK] * len(items)
            grown = rss_mib(srv.pid) - base
            st = c.stats()
            # Bound: capacity (1 MiB) plus allocator slack; 8 MiB leaves room for malloc's
            # own arenas and the interpreter, far below the ~326 MiB this used to take.
            assert grown < 8, f"RSS grew by {grown:.1f} MiB for {st['items']} items"
            assert st["evictions"] > 0 and 0 < st["items"] < 10_000
            assert st["meta_bytes"] <= st["meta_slab_bytes"] <= st["capacity_bytes"]
            assert st["allocated_bytes"] <= st["capacity_bytes"]
            # The newest items are there; the server still serves.
            last = [b"key-%08d" % i for i in range(n - 10, n)]
            assert all(v is not None for v in c.get(last))
    finally:
        assert srv.stop() == 0


def _declare_put(port: int, key: bytes, value_len: int, send: bytes = b"") -> socket.socket:
    """Opens a connection and sends a PUT frame's header and table for one value of value_len
    bytes, then only `send` of the value (the rest never comes)."""
    table = struct.pack("<HHIQQ", len(key), 0, 0, value_len, 0) + key
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(header(PUT, 1, 1, len(table) + value_len) + table + send)
    return sock


def _fill(c: WireClient, n: int, size: int) -> list[bytes]:
    keys = [b"fill-%d" % i for i in range(n)]
    for k in keys:
        assert c.put([(k, os.urandom(size))]) == [OK]
    return keys


def test_declared_but_unsent_value_evicts_nothing(make_server):
    # The server reserved (and so evicted) room for a declared value at once, and held it until
    # the slow-frame timeout, whether or not a byte of it ever came.
    s = make_server(capacity="32MiB", prefault=False, idle_timeout=30)
    with WireClient(s.port) as c:
        keys = _fill(c, 40, 1 * MiB)  # over capacity: the cache is full and has evicted
        before = s.stats()
        assert before["evictions"] > 0
        present = [k for k, v in zip(keys, c.exists(keys)) if v == OK]
        stalled = [_declare_put(s.port, b"stall%d" % i, 16 * MiB, os.urandom(1000)) for i in range(3)]
        time.sleep(0.5)
        after = s.stats()
        assert after["evictions"] == before["evictions"], "evicted for bytes that never arrived"
        assert c.exists(present) == [OK] * len(present)
        assert after["pending_put_bytes"] == 0
        # A value that does arrive is still stored, evicting for itself.
        v = os.urandom(3 * MiB)
        assert c.put([(b"real", v)]) == [OK]
        assert c.get([b"real"]) == [v]
        for sock in stalled:
            sock.close()


def test_pending_put_bytes_bounded_in_total_and_per_connection(make_server):
    s = make_server(
        capacity="64MiB",
        prefault=False,
        max_pending_put_bytes="8MiB",
        max_pending_put_bytes_per_connection="4MiB",
    )
    socks = [_declare_put(s.port, b"p%d" % i, 3 * MiB) for i in range(6)]
    try:
        time.sleep(0.4)
        st = s.stats()
        # Free space is lent without eviction, but only within the budget: two 3 MiB values.
        assert 0 < st["pending_put_bytes"] <= 8 * MiB, st["pending_put_bytes"]
        assert st["evictions"] == 0
        with WireClient(s.port) as c:  # others are served meanwhile
            assert c.put([(b"x", b"y" * 5000)]) == [OK]
        # A value over the per-connection budget that does not fit in the socket: NO_SPACE once
        # its bytes arrive, and the stream stays in sync.
        with WireClient(s.port) as c:
            big = os.urandom(6 * MiB)
            assert c.put([(b"big", big), (b"after", b"ok")]) in ([NO_SPACE, OK], [OK, OK])
            assert c.get([b"after"]) == [b"ok"]
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while s.stats()["pending_put_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.stats()["pending_put_bytes"] == 0


def test_full_cache_still_takes_values_of_every_size(make_server):
    # Waiting for bytes to land before evicting must not stall any size: small (buffered),
    # medium (in the socket), larger than the socket buffer (partly landed).
    s = make_server(capacity="32MiB", prefault=False, socket_buffer_bytes=256 << 10)
    with WireClient(s.port) as c:
        _fill(c, 40, 1 * MiB)
        for size in (0, 100, 20_000, 300_000, 1 * MiB, 8 * MiB, 20 * MiB):
            v = os.urandom(size)
            assert c.put([(b"s%d" % size, v)]) == [OK], size
            assert c.get([b"s%d" % size]) == [v]
        assert s.stats()["allocated_bytes"] <= s.stats()["capacity_bytes"]
