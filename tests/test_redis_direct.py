"""GET replies received straight into caller buffers (membrain.tiers.redis_direct and the native
reader under it, csrc/transport/redis_get_reader.cpp).

Every reply a GET can get from a real redis-server (value, nil, another length, a checksum
mismatch, an error line) in one batch, on one redis-py connection that must stay usable. Then,
to isolate the reader (no real server sends these), scripted sockets: the same replies cut into
pieces of every size, replies no GET can produce, and values cut off mid-body, which must end by
the deadline, drop the connection, and write nothing into the buffers after the call."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable

import pytest

pytest.importorskip("redis")

import redis

from membrain import _native
from membrain.bench.redis_local import RedisNode, have_redis
from membrain.tiers.redis_backend import RedisBackend, pack
from membrain.tiers.redis_direct import RespProtocolError, get_batch_into

BLOCK = 256 << 10


def test_every_get_reply_in_one_batch_on_a_real_server(standalone: RedisNode) -> None:
    r = redis.Redis(host="127.0.0.1", port=standalone.port)
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
    conn = redis.Connection(host="127.0.0.1", port=standalone.port, socket_timeout=5)
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


def test_the_backend_reads_many_blocks_through_one_pooled_connection(standalone: RedisNode) -> None:
    b = RedisBackend([f"redis://{standalone.endpoint}"])
    try:
        keys = [os.urandom(16) for _ in range(24)]
        vals = [os.urandom(BLOCK) for _ in keys]
        assert all(b.put_async(keys, vals).result(timeout=10))
        r = redis.Redis(host="127.0.0.1", port=standalone.port)
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


# ------------------------------------------------------------------ the native reader alone


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n" % len(b) + b + b"\r\n"


def _read(
    stream: bytes,
    sizes: list[int],
    chunks: list[int] | None = None,
    close: bool = False,
    timeout_ms: int = 2000,
) -> tuple[list[bool], list[bytes], str, str, list[bytearray]]:
    """Feeds ``stream`` into a socketpair (in pieces of ``chunks`` bytes, or whole) from a thread
    while the native reader reads len(sizes) replies into fresh buffers of those sizes."""
    a, b = socket.socketpair()

    def feed() -> None:
        pos = 0
        for n in chunks or [len(stream)]:
            a.sendall(stream[pos : pos + n])
            pos += n
            if chunks:
                time.sleep(0)  # let the reader see each piece on its own
        if pos < len(stream):
            a.sendall(stream[pos:])
        if close:
            a.close()

    t = threading.Thread(target=feed)
    t.start()
    bufs = [bytearray(n) for n in sizes]
    try:
        hits, errors, failure, detail = _native.redis_read_gets(b.fileno(), bufs, timeout_ms)
    finally:
        t.join()
        b.close()
        if not close:
            a.close()
    return hits, errors, failure, detail, bufs


def _every_reply() -> tuple[bytes, list[int], list[bool], list[bytes], dict[int, bytes]]:
    v0, v1, v2 = os.urandom(3000), os.urandom(17), os.urandom(5000)
    bad = bytearray(pack(v2))
    bad[0] ^= 1
    stream = b"".join(
        [
            _bulk(pack(v0)),  # 0 hit
            b"$-1\r\n",  # 1 nil
            _bulk(pack(v1)[:-1]),  # 2 another length: skipped
            b"-MOVED 3999 127.0.0.1:6381\r\n",  # 3 error
            b"_\r\n",  # 4 RESP3 null
            b"!21\r\nSYNTAX invalid syntax\r\n",  # 5 RESP3 blob error
            _bulk(bytes(bad)),  # 6 checksum mismatch
            _bulk(pack(v1)),  # 7 hit
            _bulk(b"\r\n" * 9),  # 8 a foreign value made of CRLFs
        ]
    )
    sizes = [3000, 17, 17, 5, 5, 5, 5000, 17, 10]
    hits = [True, False, False, False, False, False, False, True, False]
    errors = [b"MOVED 3999 127.0.0.1:6381", b"SYNTAX invalid syntax"]
    return stream, sizes, hits, errors, {0: v0, 7: v1}


def test_the_reader_gives_one_answer_however_the_stream_is_cut() -> None:
    stream, sizes, want_hits, want_errors, values = _every_reply()
    rng = random.Random(7)
    cuts: list[list[int] | None] = [None, [1] * len(stream)]  # whole, and byte by byte
    cuts += [[rng.randint(1, 40) for _ in range(len(stream))] for _ in range(5)]
    cuts += [[rng.randint(1, 6000) for _ in range(len(stream))] for _ in range(5)]
    for chunks in cuts:
        # A deadline far off: thousands of tiny writes on a busy 2-core host take their time.
        hits, errors, failure, detail, bufs = _read(stream, sizes, chunks, timeout_ms=60_000)
        assert (failure, detail) == ("", ""), chunks[:10] if chunks else None
        assert hits == want_hits and errors == want_errors
        for i, v in values.items():
            assert bytes(bufs[i]) == v
        assert bufs[1] == bytearray(17) and bufs[2] == bytearray(17)  # untouched


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"+OK\r\n", "answered with '\\+OK'"),
        (b"*1\r\n$1\r\nx\r\n", "answered with"),
        (b"$abc\r\n", "bad length 'abc'"),
        (b"$12\r\n" + b"x" * 12 + b"\r\n", None),  # another length: a miss, and fine
        (b"\r\n", "empty reply line"),
        (b"-" + b"e" * (70 << 10), "no line end"),
        (_bulk(pack(b"abcd"))[:-2] + b"XY", "not terminated by CRLF"),
        (_bulk(pack(b"abcd")) + b"+extra\r\n", "bytes after the last reply"),
        (b"$3\r\nabcXY", "not terminated by CRLF"),  # a skipped value's end is checked too
        (b"$-2\r\n", "bulk length -2"),
        (b"$9223372036854775807\r\n", "bulk length 9223372036854775807"),  # not drained
        (b"$99999999999999999999\r\n", "bad length"),  # beyond int64
    ],
)
def test_replies_no_get_can_produce_are_protocol_errors(stream: bytes, match: str | None) -> None:
    _hits, _errors, failure, detail, _bufs = _read(stream, [4])
    if match is None:
        assert failure == ""
    else:
        assert failure == "protocol"
        import re

        assert re.search(match, detail), detail


def test_a_stalled_or_closed_stream_ends_the_read() -> None:
    value = pack(os.urandom(100_000))
    part = _bulk(value)[:50_000]
    t = time.monotonic()
    hits, _e, failure, _d, _b = _read(part, [100_000], timeout_ms=300)
    assert failure == "timed_out" and hits == [False]
    assert 0.25 < time.monotonic() - t < 2.0
    _h, _e, failure, detail, _b = _read(part, [100_000], close=True)
    assert failure == "closed" and "closed" in detail
    with pytest.raises(ValueError, match="fd must be"):
        _native.redis_read_gets(-1, [bytearray(4)], 100)
    with pytest.raises(ValueError, match="buffer 0 must be a C-contiguous writable"):
        _native.redis_read_gets(0, [b"read-only"], 100)


@pytest.mark.skipif(not have_redis(), reason="redis-server / redis-cli not installed")
def test_the_tls_path_reads_through_redis_py_with_the_same_answers(standalone: RedisNode) -> None:
    """rediss:// sockets cannot be read natively; that path (exercised here over plain TCP)
    gives the same answers: hits byte-exact, a corrupt or short value a miss."""
    b = RedisBackend([f"redis://{standalone.endpoint}"])
    r = redis.Redis(host="127.0.0.1", port=standalone.port)
    try:
        keys = [os.urandom(16) for _ in range(4)]
        vals = [os.urandom(BLOCK) for _ in keys]
        assert all(b.put_async(keys, vals).result(timeout=10))
        stored = b"mb:default:" + keys[1]
        bad = bytearray(r.get(stored))
        bad[7] ^= 1
        r.set(stored, bytes(bad))
        r.set(b"mb:default:" + keys[2], pack(vals[2][:-1]))
        views = [memoryview(bytearray(BLOCK)) for _ in keys]
        out = b._get_into_through_redis_py(keys, views, [False] * 4, None)
        assert out == [True, False, False, True]
        assert bytes(views[0]) == vals[0] and bytes(views[3]) == vals[3]
        assert bytes(views[1]) == bytes(BLOCK) and bytes(views[2]) == bytes(BLOCK)
    finally:
        r.close()
        b.close()


def test_a_node_call_still_queued_at_the_deadline_is_a_miss_not_the_nodes_fault(
    standalone: RedisNode,
) -> None:
    """The backend's I/O pool is shared: a node's call that cannot start before the deadline
    (the pool busy with other calls) is dropped, the caller does not wait for the pool, and the
    node's breaker is not charged for it."""
    b = RedisBackend([f"redis://{standalone.endpoint}"], io_threads=1)
    try:
        client = b._single
        busy = threading.Event()
        b._io.submit(busy.wait, 5)  # the only I/O thread is taken
        b._groups = lambda keys: [("first", client, [0]), ("queued", client, [1])]  # type: ignore[method-assign]
        called: list[list[int]] = []

        def node_call(_client: object, idx: list[int], _deadline: float) -> str:
            called.append(idx)
            return "ok"

        t = time.monotonic()
        done = b._run([b"a", b"b"], node_call, timeout_ms=200, bounded=True)
        assert time.monotonic() - t < 1.5  # not the 5 s the pool stays busy
        busy.set()
        assert done == [([0], "ok")] and called == [[0]]
        time.sleep(0.1)  # the dropped call never runs, even once the pool is free
        assert called == [[0]]
        assert b._breaker("queued").failures == 0
    finally:
        busy.set()
        b.close()
