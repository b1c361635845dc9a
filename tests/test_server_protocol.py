"""Every opcode against an in-process server, framed by tests/wire.py from docs/protocol.md."""

from __future__ import annotations

import os
import struct

from wire import (
    BAD_REQUEST,
    CHECKSUM_MISMATCH,
    DELETE,
    EXISTS,
    GET,
    HEADER_BYTES,
    HELLO,
    LOOKUP_PREFIX,
    NOT_FOUND,
    OK,
    PING,
    PUT,
    REPLY,
    STATS,
    TOO_LARGE,
    UNSUPPORTED_VERSION,
    WireClient,
    header,
    keys_frame,
    parse_get,
    put_frame,
)


def test_hello_reports_limits(inproc_server):
    with WireClient(inproc_server.port) as c:
        f = c.hello(b"tenant-a")
        assert f.op == HELLO | REPLY and f.status == OK
        version, max_batch, max_key, _res, max_value, max_payload = struct.unpack("<IIIIQQ", f.payload)
        assert (version, max_batch, max_key) == (1, 1024, 128)
        assert max_value <= 64 << 20 and max_payload == 1 << 30


def test_put_get_exists_lookup_delete_round_trip(inproc_server):
    vals = [(b"k%d" % i, os.urandom(1000 * i + 1)) for i in range(8)]
    with WireClient(inproc_server.port) as c:
        assert c.put(vals) == [OK] * 8
        assert c.get([k for k, _ in vals]) == [v for _, v in vals]
        assert c.get([b"k1", b"missing", b"k3"]) == [vals[1][1], None, vals[3][1]]
        assert c.exists([b"k0", b"nope", b"k7"]) == [OK, NOT_FOUND, OK]
        assert c.lookup_prefix([b"k0", b"k1", b"k2", b"gap", b"k4"]) == 3
        assert c.lookup_prefix([b"gap", b"k0"]) == 0
        assert c.delete([b"k0", b"k1", b"never"]) == 2
        assert c.get([b"k0", b"k2"]) == [None, vals[2][1]]
        assert c.lookup_prefix([]) == 0


def test_reply_count_and_ids(inproc_server):
    with WireClient(inproc_server.port) as c:
        for op in (EXISTS, LOOKUP_PREFIX, DELETE, GET):
            f = c.call(keys_frame(op, [b"a", b"b"], rid=0xDEADBEEF12345678))
            assert (
                f.op == op | REPLY and f.request_id == 0xDEADBEEF12345678 and f.count == 2 and f.status == OK
            )


def test_overwrite_publishes_new_value(inproc_server):
    with WireClient(inproc_server.port) as c:
        c.put([(b"x", b"old" * 1000)])
        c.put([(b"x", b"new!" * 5000)])
        assert c.get([b"x"]) == [b"new!" * 5000]
        assert c.stats()["items"] == 1


def test_empty_value_and_binary_keys(inproc_server):
    key = bytes(range(128))
    with WireClient(inproc_server.port) as c:
        assert c.put([(key, b""), (b"\x00", b"z")]) == [OK, OK]
        assert c.get([key, b"\x00"]) == [b"", b"z"]


def test_stats_and_ping(inproc_server):
    with WireClient(inproc_server.port) as c:
        assert c.ping(b"hello") == b"hello"
        assert c.ping() == b""
        c.put([(b"a", b"1" * 100)])
        c.get([b"a", b"b"])
        s = c.stats()
        for field in (
            "used_bytes",
            "capacity_bytes",
            "items",
            "hits",
            "misses",
            "evictions",
            "expired",
            "puts",
            "gets",
            "connections",
            "fragmentation",
        ):
            assert field in s, field
        assert s["used_bytes"] == 100 and s["items"] == 1 and s["hits"] == 1 and s["misses"] == 1
        assert s["capacity_bytes"] <= 64 << 20 and s["connections"] >= 1


def test_checksum_mismatch_is_dropped(inproc_server):
    with WireClient(inproc_server.port) as c:
        f = c.call(
            put_frame(
                [(b"good", b"a" * 5000), (b"bad", b"b" * 5000)],
                rid=7,
                checksums=[__import__("membrain").checksum64(b"a" * 5000), 12345],
            )
        )
        assert list(f.payload) == [OK, CHECKSUM_MISMATCH]
        assert c.get([b"good", b"bad"]) == [b"a" * 5000, None]
        assert c.ping(b"still in sync") == b"still in sync"


def test_item_level_errors_keep_stream_in_sync(make_server):
    s = make_server(capacity="1MiB", slab_bytes=65536)
    big = os.urandom(2 << 20)  # larger than capacity
    with WireClient(s.port) as c:
        table = struct.pack("<HHIQQ", 0, 0, 0, 3, 0) + struct.pack("<HHIQQ", 1, 0, 0, len(big), 0)
        payload = table + b"k" + b"abc" + big
        f = c.call(header(PUT, 1, 2, len(payload)) + payload)
        assert list(f.payload) == [BAD_REQUEST, TOO_LARGE]
        assert c.ping(b"ok") == b"ok"


def test_pipelining_in_order(inproc_server):
    with WireClient(inproc_server.port) as c:
        frames = []
        for i in range(200):
            frames.append(put_frame([(b"p%d" % i, b"%d" % i * 100)], rid=1000 + 3 * i))
            frames.append(keys_frame(GET, [b"p%d" % i], rid=1001 + 3 * i))
            frames.append(header(PING, 1002 + 3 * i, 0, 4) + b"ping")
        c.send(b"".join(frames))
        for i in range(200):
            f1, f2, f3 = c.recv_frame(), c.recv_frame(), c.recv_frame()
            assert (f1.request_id, f2.request_id, f3.request_id) == (1000 + 3 * i, 1001 + 3 * i, 1002 + 3 * i)
            assert parse_get(f2.payload, 1) == [b"%d" % i * 100]
            assert f3.payload == b"ping"


def test_large_batch_of_1mib_values(inproc_server):
    vals = [(b"big%d" % i, os.urandom(1 << 20)) for i in range(16)]
    with WireClient(inproc_server.port) as c:
        assert c.put(vals) == [OK] * 16
        assert c.get([k for k, _ in vals]) == [v for _, v in vals]


def test_large_values_are_received_in_place(inproc_server):
    """Bytes of large PUT values go straight into their storage slot: only the read-ahead after a
    frame header (4 KiB at most) passes through the input buffer and costs a second copy. Small
    values do go through the buffer, several per read, to save system calls, but reads of them
    stop where a large value begins."""
    big = [(b"inplace%d" % i, os.urandom(1 << 20)) for i in range(16)]
    small = [(b"small%d" % i, os.urandom(1024)) for i in range(64)]
    with WireClient(inproc_server.port) as c:
        before = inproc_server.stats()["put_bytes_buffered"]
        assert c.put(big) == [OK] * 16
        after_big = inproc_server.stats()["put_bytes_buffered"]
        assert c.put(small) == [OK] * 64
        after_small = inproc_server.stats()["put_bytes_buffered"]
        assert c.get([k for k, _ in big]) == [v for _, v in big]
        assert c.get([k for k, _ in small]) == [v for _, v in small]
    assert after_big - before <= 4096, after_big - before
    assert after_small - after_big >= 32 * 1024, after_small - after_big

    # Small values before, between and after large ones, in one frame and in pipelined frames.
    mixed = [
        (b"m0", os.urandom(3000)),
        (b"m1", os.urandom(3000)),
        (b"m2", os.urandom(3000)),
        (b"m3", os.urandom(4 << 20)),
        (b"m4", os.urandom(5000)),
        (b"m5", os.urandom(1 << 20)),
    ]
    small_bytes = sum(len(v) for _, v in mixed if len(v) < 16384)
    with WireClient(inproc_server.port) as c:
        before = inproc_server.stats()["put_bytes_buffered"]
        assert c.put(mixed) == [OK] * 6
        one_frame = inproc_server.stats()["put_bytes_buffered"] - before
        c.send(put_frame(mixed[:3], rid=900) + put_frame(mixed[3:], rid=901))
        assert [c.recv_frame().request_id for _ in range(2)] == [900, 901]
        two_frames = inproc_server.stats()["put_bytes_buffered"] - before - one_frame
        assert c.get([k for k, _ in mixed]) == [v for _, v in mixed]
    assert one_frame <= small_bytes + 4096, one_frame
    # After a frame that ends in small values the server reads a full buffer ahead (that is what
    # keeps pipelined small PUTs at one recv per 64 KiB), so up to 64 KiB of the next frame's
    # first value can pass through the buffer once.
    assert two_frames <= small_bytes + 4096 + 65536, two_frames


def _expect_error(port, data, status):
    with WireClient(port) as c:
        c.send(data)
        f = c.recv_frame()
        assert f.status == status, f
        c.expect_closed()


def test_frame_errors_reply_then_close(inproc_server):
    p = inproc_server.port
    good = header(PING, 5, 0, 0)
    _expect_error(p, b"XXXX" + good[4:], BAD_REQUEST)  # magic
    _expect_error(p, good[:36] + bytes([good[36] ^ 1]) + good[37:], BAD_REQUEST)  # checksum
    _expect_error(p, header(PING, 5, version=2), UNSUPPORTED_VERSION)
    _expect_error(p, header(PING, 5, reserved=1), BAD_REQUEST)
    _expect_error(p, header(PING, 5, flags=1), BAD_REQUEST)
    _expect_error(p, header(0x42, 5), BAD_REQUEST)  # unknown op
    _expect_error(p, header(PUT | REPLY, 5), BAD_REQUEST)  # reply opcode
    _expect_error(p, header(GET, 5, count=5000, payload_len=5000 * 3), TOO_LARGE)  # count
    _expect_error(p, header(PUT, 5, count=1, payload_len=1 << 40), TOO_LARGE)  # payload
    _expect_error(p, header(PING, 5, payload_len=1 << 20), TOO_LARGE)
    _expect_error(p, header(STATS, 5, payload_len=1) + b"x", BAD_REQUEST)
    _expect_error(p, header(GET, 5, 2, 5) + b"\x01\x00a\x00\x00", BAD_REQUEST)  # empty key
    _expect_error(p, header(GET, 5, 1, 300) + b"\x2c\x01" + b"k" * 298, TOO_LARGE)  # over key limit
    # PUT whose table lies about the payload length
    table = struct.pack("<HHIQQ", 1, 0, 0, 10, 0)
    _expect_error(p, header(PUT, 5, 1, 24 + 1 + 5) + table + b"k" + b"12345", BAD_REQUEST)
    # HELLO with a bad namespace
    ns = b"bad ns!"
    payload = struct.pack("<HH", len(ns), 0) + ns
    _expect_error(p, header(HELLO, 5, 0, len(payload)) + payload, BAD_REQUEST)
    with WireClient(p) as c:  # the server is still fine
        assert c.ping(b"alive") == b"alive"
    assert inproc_server.stats()["protocol_errors"] >= 14


def test_truncated_frame_then_close(inproc_server):
    with WireClient(inproc_server.port) as c:
        c.send(put_frame([(b"t", b"v" * 100000)])[:50000])
    with WireClient(inproc_server.port) as c:
        assert c.get([b"t"]) == [None]  # never published


def test_header_bytes_constant():
    assert len(header(PING)) == HEADER_BYTES
