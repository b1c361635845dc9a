"""Hostile bytes against a real `membrain server` subprocess: random garbage, mutated valid
frames (flipped header bits, lying lengths, huge counts, truncation). Afterwards a well-behaved
client must still be served and the process RSS must stay within capacity + documented overhead."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire import GET, OK, PING, PUT, WireClient, header, keys_frame, put_frame

from membrain import checksum64
from membrain.server import spawn_server

CAPACITY = 32 << 20
# docs/server.md: interpreter + extension baseline, plus per-connection buffers; generous on
# purpose - the point is that garbage cannot make the server allocate by its lengths.
OVERHEAD = 160 << 20


@pytest.fixture(scope="module")
def srv():
    s = spawn_server(
        capacity=CAPACITY, extra_args=["--idle-timeout", "2", "--threads", "2", "--log-level", "WARNING"]
    )
    yield s
    assert s.stop() == 0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def blast(port: int, data: bytes) -> None:
    """Sends `data`, half-closes, reads whatever comes back until the server closes or goes quiet."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return
        s.settimeout(0.5)
        try:
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        s.close()


def valid_frames(rng: random.Random) -> list[bytes]:
    k = [b"fz%d" % rng.randrange(50) for _ in range(rng.randrange(1, 5))]
    return [
        put_frame([(x, os.urandom(rng.randrange(0, 5000))) for x in k], rid=rng.randrange(1 << 63)),
        keys_frame(GET, k, rid=1),
        header(PING, 2, 0, 3) + b"abc",
        keys_frame(rng.choice([4, 5, 6]), k, rid=3),
    ]


def mutate(frame: bytes, rng: random.Random) -> bytes:
    b = bytearray(frame)
    choice = rng.randrange(6)
    if choice == 0:  # flip bits anywhere
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif choice == 1:  # lie about the payload length, with a valid header checksum
        plen = rng.choice([0, 1, len(b), 1 << 30, (1 << 64) - 1, rng.randrange(1 << 40)])
        struct.pack_into("<Q", b, 24, plen)
        struct.pack_into("<I", b, 36, checksum64(bytes(b[:36])) & 0xFFFFFFFF)
    elif choice == 2:  # huge or wrong counts
        struct.pack_into("<I", b, 16, rng.choice([0, 1, 1025, 0xFFFFFFFF, rng.randrange(1 << 32)]))
        struct.pack_into("<I", b, 36, checksum64(bytes(b[:36])) & 0xFFFFFFFF)
    elif choice == 3:  # truncate
        del b[rng.randrange(len(b)) :]
    elif choice == 4 and len(b) > 64:  # lying lengths inside the payload (key_len / value_len)
        i = rng.randrange(40, len(b) - 8)
        struct.pack_into("<Q" if rng.random() < 0.5 else "<H", b, i, rng.randrange(1 << 16))
    else:  # random opcode
        b[5] = rng.randrange(256)
        struct.pack_into("<I", b, 36, checksum64(bytes(b[:36])) & 0xFFFFFFFF)
    return bytes(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=600))
def test_random_bytes(srv, data):
    blast(srv.port, data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.randoms(use_true_random=False), st.integers(0, 3))
def test_mutated_frames(srv, rng, which):
    frames = valid_frames(rng)
    data = b"".join(frames[:which]) + mutate(frames[which], rng) + b"".join(frames[which + 1 :])
    blast(srv.port, data)


def test_huge_claims_do_not_allocate(srv):
    """Headers promising gigabytes (then silence) must not make the server reserve them."""
    socks = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", srv.port))
        table = struct.pack("<HHIQQ", 2, 0, 0, 900 << 20, 0)
        s.sendall(header(PUT, i, 1, 24 + 2 + (900 << 20)) + table + b"kk" + b"x" * 1000)
        socks.append(s)
    assert rss_bytes(srv.pid) < CAPACITY + OVERHEAD
    for s in socks:
        s.close()


def test_still_serves_and_rss_bounded_after_fuzz(srv):
    with WireClient(srv.port) as c:
        # fill beyond capacity too, so the bound is tested with real data in it
        for i in range(48):
            assert c.put([(b"fill%d" % i, os.urandom(1 << 20))]) == [OK]
        v = os.urandom(123457)
        assert c.put([(b"after-fuzz", v)]) == [OK]
        assert c.get([b"after-fuzz"]) == [v]
        st = c.stats()
    assert st["used_bytes"] <= CAPACITY and st["protocol_errors"] > 0
    rss = rss_bytes(srv.pid)
    assert rss < CAPACITY + OVERHEAD, f"RSS {rss >> 20} MiB"
    print(f"\nserver RSS after fuzz + fill: {rss / 2**20:.1f} MiB (capacity {CAPACITY >> 20} MiB)")
