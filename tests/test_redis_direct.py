"""GET replies received straight into caller buffers (membrain.tiers.redis_direct).

Every reply a GET can get from a real redis-server (value, nil, another length, a checksum
mismatch, an error line) in one batch, on one redis-py connection that must stay usable; then,
against a scripted socket (to isolate the reader: no real server sends these), a reply no GET
can produce and a value cut off mid-body, which must end as misses by the deadline, drop the
connection, and write nothing into the buffers after the call."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

pytest.importorskip("redis")

import redis

from membrain.bench.redis_local import RedisNode, have_redis
from membrain.tiers.redis_backend import RedisBackend, pack
from membrain.tiers.redis_direct import RespProtocolError, get_batch_into

BLOCK = 256 << 10


@pytest.fixture
def node():
    if not have_redis():
        pytest.skip("redis-server / redis-cli not installed")
    n = RedisNode()
    yield n
    n.close()


def test_every_get_reply_in_one_batch_on_a_real_server(node: RedisNode) -> None:
    r = redis.Redis(host="127.0.0.1", port=node.port)
    vals = [os.urandom(BLOCK) for _ in range(3)]
    r.set(b"hit0", pack(vals[0]))
    r.set(b"short", pack(vals[1][:-1]))  # another block size: skipped unread
    bad = bytearray(pack(vals[2]))
    bad[5] ^= 0x10
    r.set(b"flipped", bytes(bad))
    r.rpush(b"list", b"x")  # GET on a list: -WRONGTYPE
    r.set(b"hit1", pack(vals[2]))
    keys = [b"hit0", b"absent", b"short", b"flipped", b"list", b"hit1"]
    bufs = [bytearray(BLOCK) for _ in keys]
    # redis-py's default protocol (RESP3 in 8.x) answers a missing key with "_"; the backend
    # itself speaks RESP2 ("$-1"), which test_redis_backend's misses cover.
    conn = redis.Connection(host="127.0.0.1", port=node.port, socket_timeout=5)
    conn.connect()
    try:
        hits, errors = get_batch_into(conn, keys, [memoryview(b) for b in bufs], time.monotonic() + 5)
        assert hits == [True, False, False, False, False, True]
        assert bytes(bufs[0]) == vals[0] and bytes(bufs[5]) == vals[2]
        assert bufs[1] == bytearray(BLOCK) and bufs[2] == bytearray(BLOCK)
        assert len(errors) == 1 and errors[0].startswith(b"WRONGTYPE")
        # The stream is exactly at a reply boundary: redis-py's own reads work on it.
        assert conn.can_read() is False
        conn.send_command("PING")
        assert conn.read_response() in (b"PONG", "PONG")
        assert conn._sock.gettimeout() == 5  # redis-py's timeout is back
    finally:
        conn.disconnect()
        r.close()


def test_the_backend_reads_many_blocks_through_one_pooled_connection(node: RedisNode) -> None:
    b = RedisBackend([f"redis://{node.endpoint}"])
    try:
        keys = [os.urandom(16) for _ in range(24)]
        vals = [os.urandom(BLOCK) for _ in keys]
        assert all(b.put_async(keys, vals).result(timeout=10))
        r = redis.Redis(host="127.0.0.1", port=node.port)
        b.get_into(keys[:1], [bytearray(BLOCK)])  # the reader's connection exists from here
        accepted = r.info("stats")["total_connections_received"]
        for _ in range(3):
            bufs = [bytearray(BLOCK) for _ in keys]
            assert b.get_into(keys, bufs) == [True] * len(keys)
            assert [bytes(x) for x in bufs] == vals
        # Each batch left its connection at a reply boundary, so the pool reused it.
        assert r.info("stats")["total_connections_received"] == accepted
        r.close()
    finally:
        b.close()


class _Scripted:
    """A loopback socket that answers redis-py's connect handshake with +OK and each GET with
    ``reply(i)``: bytes, or a callable that writes to the client socket itself."""

    def __init__(self, reply: Callable[[int, socket.socket], None]) -> None:
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._reply = reply
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        c, _ = self._srv.accept()
        f = c.makefile("rb")
        gets = 0
        try:
            while True:
                line = f.readline()
                if not line:
                    break
                args = []
                for _ in range(int(line[1:])):
                    n = int(f.readline()[1:])
                    args.append(f.read(n + 2)[:-2])
                if args[0].upper() == b"GET":
                    self._reply(gets, c)
                    gets += 1
                else:
                    c.sendall(b"+OK\r\n")
        except OSError:
            pass
        self.closed.set()
        c.close()

    def close(self) -> None:
        self._srv.close()


def _conn(port: int) -> redis.Connection:
    c = redis.Connection(host="127.0.0.1", port=port, socket_timeout=5, protocol=2)  # as the backend
    c.connect()
    return c


def test_a_reply_no_get_can_produce_is_a_protocol_error() -> None:
    srv = _Scripted(lambda i, c: c.sendall(b"*1\r\n$1\r\nx\r\n"))  # an array
    conn = _conn(srv.port)
    try:
        buf = bytearray(BLOCK)
        with pytest.raises(RespProtocolError, match="answered with"):
            get_batch_into(conn, [b"k"], [memoryview(buf)], time.monotonic() + 2)
        assert buf == bytearray(BLOCK)
    finally:
        conn.disconnect()
        srv.close()


def test_a_value_cut_off_mid_body_ends_by_the_deadline_and_is_never_written_later() -> None:
    value = pack(os.urandom(BLOCK))
    half = len(value) // 2
    release = threading.Event()

    def stall_then_finish(i: int, c: socket.socket) -> None:
        c.sendall(b"$%d\r\n" % len(value) + value[:half])
        release.wait(10)
        try:
            c.sendall(value[half:] + b"\r\n")
        except OSError:
            pass

    srv = _Scripted(stall_then_finish)
    b = RedisBackend([f"redis://127.0.0.1:{srv.port}"], timeout_ms=300)
    try:
        buf = bytearray(BLOCK)
        t = time.monotonic()
        with pytest.raises(ConnectionError):  # its only node failed: RemoteTier makes it misses
            b.get_into([b"k"], [buf])
        assert time.monotonic() - t < 1.0
        landed = bytes(buf)
        assert landed[: half // 2] == value[: half // 2]  # the first half did land ...
        release.set()  # ... and the rest arrives after the call
        time.sleep(0.3)
        assert bytes(buf) == landed  # nothing written after the return
        assert srv.closed.wait(5)  # the half-read connection was dropped, not pooled
    finally:
        release.set()
        b.close()
        srv.close()
