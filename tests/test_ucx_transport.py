"""UCX transport: every op over `ucx://`, TCP/UCX interoperability on the same data, restart
behaviour and hostile input on the UCX listener. Loopback, with UCX over TCP and over shared
memory (UCX_TLS, set for both the server subprocess and this process's client context)."""

from __future__ import annotations

import gc
import os
import struct
import time

import pytest

import membrain
from membrain import _native
from membrain.utils.net import free_port

pytestmark = pytest.mark.skipif(
    not _native.native_info()["ucx"], reason="membrain built without UCX (native_info()['ucx'] is False)"
)

# UCX 1.13 accepts transport names and aliases: "tcp", "sm"/"shm" (posix/sysv/cma), "self".
TLS = ["tcp", "sm,self,tcp"]
MiB = 1 << 20


def _spawn(tls: str, port: int = 0, ucx_port: int = 0, extra: tuple[str, ...] = (), capacity: str = "256MiB"):
    from membrain.server import spawn_server

    deadline = time.monotonic() + 15
    while True:
        try:
            return spawn_server(
                capacity=capacity,
                port=port,
                extra_args=["--ucx-port", str(ucx_port), "--threads", "1", *extra],
                env={**os.environ, "UCX_TLS": tls},
                timeout=20,
            )
        except RuntimeError:
            if time.monotonic() > deadline:  # a just-freed port can linger briefly
                raise
            time.sleep(0.3)


@pytest.fixture(params=TLS)
def tls(request, monkeypatch):
    # The client context is created on first use with the environment of that moment; make
    # sure the previous parameter's context is gone first.
    gc.collect()
    monkeypatch.setenv("UCX_TLS", request.param)
    yield request.param
    gc.collect()


@pytest.fixture
def srv(tls):
    s = _spawn(tls)
    yield s
    s.kill()


def _ucx(srv, **kw):
    return _native.UcxConnection("127.0.0.1", srv.ucx_port, timeout_ms=kw.pop("timeout_ms", 10000), **kw)


def test_ready_line_and_every_op(srv):
    assert srv.ucx_endpoint and "ucx=ucx://127.0.0.1:" in srv.ready_line
    c = _ucx(srv)
    assert c.ping() < 5
    sizes = [0, 1, 100, 8 << 10, 64 << 10, MiB, 3 * MiB + 7]
    vals = [os.urandom(n) for n in sizes]
    keys = [f"k{i}".encode() for i in range(len(vals))]
    assert c.put(keys, vals) == [0] * len(vals)
    got = c.get(keys + [b"absent"])
    assert got[:-1] == vals and got[-1] is None
    bufs = [bytearray(n) for n in sizes] + [bytearray(4)]
    st = c.get_into(keys + [b"absent"], bufs)
    assert st == [0] * len(vals) + [_native.STATUS_NOT_FOUND]
    assert [bytes(b) for b in bufs[:-1]] == vals
    small = [bytearray(10)]
    assert c.get_into([keys[5]], small) == [_native.STATUS_TOO_LARGE] and small[0] == bytearray(10)
    assert c.exists(keys + [b"absent"]) == [0] * len(vals) + [_native.STATUS_NOT_FOUND]
    assert c.lookup_prefix(keys + [b"absent"] + keys) == len(keys)
    assert c.delete(keys[:2] + [b"absent"]) == 2
    assert c.get(keys[:2]) == [None, None]
    st = c.stats()
    assert st["items"] == len(keys) - 2 and st["connections"] >= 1
    c.close()


def test_large_batches_are_chunked_to_the_am_header(srv):
    # 1000 long keys: the PUT table + keys (~150 KiB) far exceed one AM header (~8 KiB).
    c = _ucx(srv)
    keys = [(b"%04d" % i) * 32 for i in range(1000)]
    vals = [os.urandom(i % 300) for i in range(1000)]
    assert c.put(keys, vals) == [0] * 1000
    assert c.get(keys) == vals
    assert c.exists(keys) == [0] * 1000
    assert c.lookup_prefix(keys) == 1000
    assert c.delete(keys) == 1000


def test_many_small_values_split_into_value_ams(srv):
    # Short keys: ~290 items per frame, each frame's values (> 64 KiB in total) sent as one
    # value AM each; the server must take them all without calling it a flood.
    c = _ucx(srv)
    keys = [b"%04d" % i for i in range(1000)]
    vals = [os.urandom(1024 + i) for i in range(1000)]
    assert c.put(keys, vals) == [0] * 1000
    assert c.get(keys) == vals


def test_client_high_level_and_tcp_interop(srv):
    u = membrain.Client(srv.ucx_endpoint, timeout_ms=10000)
    t = membrain.Client(srv.endpoint, timeout_ms=10000)
    a = [os.urandom(MiB) for _ in range(4)]
    assert all(u.put([b"u0", b"u1", b"u2", b"u3"], a))
    assert t.get([b"u0", b"u1", b"u2", b"u3"]) == a  # written over UCX, read over TCP
    b = [os.urandom(300_000) for _ in range(3)]
    assert all(t.put([b"t0", b"t1", b"t2"], b))
    assert u.get([b"t0", b"t1", b"t2"]) == b  # written over TCP, read over UCX
    assert u.exists([b"t0", b"zz"]) == [True, False]
    assert u.lookup_prefix([b"u0", b"u1", b"nope"]) == 2
    # Namespaces are per session, as over TCP.
    n = _ucx(srv, namespace="other")
    assert n.get([b"u0"]) == [None]
    assert n.put([b"u0"], [b"ns"]) == [0]
    assert u.get([b"u0"]) == [a[0]] and n.get([b"u0"]) == [b"ns"]
    u.close()
    t.close()


def test_auth_over_ucx(tls, tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    s = _spawn(tls, extra=("--auth-token-file", str(tok)))
    try:
        with pytest.raises(ConnectionError, match="UNAUTHORIZED"):
            _native.UcxConnection("127.0.0.1", s.ucx_port, auth_token="wrong", timeout_ms=5000)
        with pytest.raises(ConnectionError):
            _native.UcxConnection("127.0.0.1", s.ucx_port, timeout_ms=5000)
        ok = _native.UcxConnection("127.0.0.1", s.ucx_port, auth_token="s3cret", timeout_ms=5000)
        assert ok.put([b"a"], [b"b"]) == [0] and ok.get([b"a"]) == [b"b"]
    finally:
        s.kill()


def test_server_restart_gives_misses_then_reconnects(tls):
    port, uport = free_port(), free_port()
    s = _spawn(tls, port, uport)
    # Generous connect budget: UCX wire-up with peer-failure handling takes a few round trips,
    # and this 2-core machine may be busy with other tests.
    c = membrain.Client(f"ucx://127.0.0.1:{uport}", timeout_ms=2500, connect_timeout_ms=2000)
    try:
        assert c.put([b"k"], [b"v" * 1000]) == [True]
        s.kill()
        t0 = time.monotonic()
        assert c.get([b"k"]) == [None]  # a miss, within the deadline
        assert time.monotonic() - t0 < 2.5 + 2.0
        s = _spawn(tls, port, uport)
        deadline = time.monotonic() + 20
        while not c.put([b"k2"], [b"w" * 5000])[0]:
            assert time.monotonic() < deadline, "client did not reconnect after the restart"
            time.sleep(0.2)
        assert c.get([b"k2", b"k"]) == [b"w" * 5000, None]
    finally:
        c.close()
        s.kill()


def _hdr(op: int, rid: int, count: int, plen: int, magic: int = 0x4E52424D, version: int = 1) -> bytes:
    h = struct.pack("<IBBHQIIQI", magic, version, op, 0, rid, count, 0, plen, 0)
    return h + struct.pack("<I", _native.checksum64(h) & 0xFFFFFFFF)


def test_peer_failure_handling_still_gets_shared_memory_lanes(srv, tls, monkeypatch):
    # The default endpoint mode handles peer failure (a dead server is an error, never an
    # abort). UCX only allows shared memory and CMA under that mode when the membrain context
    # enables their failure support; without it one host talks over TCP loopback.
    monkeypatch.delenv("MEMBRAIN_UCX_ERR_MODE", raising=False)
    c = _ucx(srv)
    info = c.transport_info
    assert "lane[" in info, info
    if tls == "tcp":
        assert "tcp" in info and "sysv" not in info and "cma" not in info, info
    else:
        assert ("sysv" in info or "posix" in info) and "cma" in info, info
    value = os.urandom(4 * MiB)  # moves by rendezvous over those lanes
    assert c.put([b"lanes"], [value]) == [0]
    assert c.get([b"lanes"]) == [value]


def test_transport_info_while_another_thread_gets(srv):
    # transport_info waits for the connection's lock; a GET holding that lock needs the GIL to
    # allocate its values. Reading it with the GIL held deadlocked the whole process, so the
    # check runs in a child that is killed if it hangs.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import threading
        from membrain import _native
        c = _native.UcxConnection("127.0.0.1", {srv.ucx_port}, timeout_ms=10000)
        keys = [b"ti%d" % i for i in range(16)]
        assert c.put(keys, [b"v" * 100000] * 16) == [0] * 16
        def loop():
            for _ in range(30):
                assert c.get(keys) == [b"v" * 100000] * 16
        t = threading.Thread(target=loop)
        t.start()
        for _ in range(200):
            assert "lane[" in c.transport_info
        t.join()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _status(reply: bytes) -> int:
    return struct.unpack_from("<I", reply, 20)[0]


@pytest.mark.parametrize("case", ["garbage", "short", "lying_len", "bad_version", "put_lies", "unknown_op"])
def test_hostile_frames_close_the_connection_server_keeps_serving(srv, case):
    c = _ucx(srv, timeout_ms=3000)
    if case == "garbage":
        hdr, data, want = os.urandom(40), b"", _native.STATUS_BAD_REQUEST
    elif case == "short":
        hdr, data, want = b"MBRN", b"", _native.STATUS_BAD_REQUEST
    elif case == "lying_len":  # header says 1000 payload bytes, the AM carries 10
        hdr, data, want = _hdr(3, 7, 10, 1000), b"\x01\x00a" + b"x" * 7, _native.STATUS_BAD_REQUEST
    elif case == "bad_version":
        hdr, data, want = _hdr(8, 7, 0, 0, version=9), b"", _native.STATUS_UNSUPPORTED_VERSION
    elif case == "put_lies":  # table claims a 1 MiB value, 3 bytes follow
        table = struct.pack("<HHIQQ", 1, 0, 0, MiB, 0) + b"k"
        hdr, data, want = _hdr(2, 7, 1, 24 + 1 + MiB) + table, b"abc", _native.STATUS_BAD_REQUEST
    else:
        hdr, data, want = _hdr(99, 7, 0, 0), b"", _native.STATUS_BAD_REQUEST
    reply = c._raw_call(hdr, data)
    assert len(reply) >= 40 and _status(reply) == want
    # The server closes that connection ...
    with pytest.raises(ConnectionError):
        for _ in range(50):
            c.ping(timeout_ms=500)
            time.sleep(0.05)
    # ... and keeps serving everyone else.
    d = _ucx(srv)
    assert d.put([b"after"], [b"ok"]) == [0] and d.get([b"after"]) == [b"ok"]
    assert d.stats()["protocol_errors"] >= 1


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_values_not_stored_never_allocate_their_declared_length(tls):
    # A PUT item the server will not store (here TOO_LARGE: over max_value_bytes = capacity) was
    # received into a scratch buffer of the peer's declared length: one 512 MiB declaration took
    # the server from ~34 to ~546 MiB of RSS before a byte of it arrived.
    srv = _spawn(tls, extra=("--capacity", "32MiB", "--no-prefault"))
    try:
        before = _rss_mib(srv.pid)
        c = _ucx(srv, timeout_ms=3000)
        # Split form (no AM data: the value would follow as its own AM, which never comes).
        table = struct.pack("<HHIQQ", 1, 0, 0, 512 * MiB, 0) + b"k"
        with pytest.raises((ConnectionError, TimeoutError, RuntimeError)):
            c._raw_call(_hdr(2, 7, 1, 24 + 1 + 512 * MiB) + table, b"", timeout_ms=1500)
        # One AM carrying a value the server drops: received through a bounded buffer.
        d = _ucx(srv, timeout_ms=10000)
        big = os.urandom(48 * MiB)
        table = struct.pack("<HHIQQ", 1, 0, 0, len(big), 0) + b"x"
        reply = d._raw_call(_hdr(2, 8, 1, 24 + 1 + len(big)) + table, big)
        assert _status(reply) == 0 and reply[40] == _native.STATUS_TOO_LARGE
        grown = _rss_mib(srv.pid) - before
        assert grown < 24, f"server RSS grew by {grown:.0f} MiB"
        assert d.put([b"after"], [b"ok"]) == [0] and d.get([b"after"]) == [b"ok"]
    finally:
        srv.kill()


def test_max_connections_counts_tcp_and_ucx_together(tls):
    # Each transport kept its own count: 4 TCP and 4 UCX connections were all served at a
    # limit of 4.
    from wire import WireClient

    srv = _spawn(tls, extra=("--max-connections", "4"))
    held = []
    try:
        for _ in range(4):
            w = WireClient(srv.port)
            assert w.ping(b"x") == b"x"
            held.append(w)
        with pytest.raises((ConnectionError, TimeoutError, RuntimeError)):
            u = _ucx(srv, timeout_ms=2000)
            for _ in range(20):  # rejected at accept; the client may only notice on use
                u.ping(timeout_ms=500)
                time.sleep(0.05)
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot serves a UCX client
            try:
                u = _ucx(srv, timeout_ms=2000)
                assert u.ping() < 5
                break
            except (ConnectionError, TimeoutError, RuntimeError):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        st = u.stats()
        assert st["connections"] <= 4 and st["connections_rejected"] >= 1
    finally:
        for w in held:
            w.close()
        srv.kill()


def test_rendezvous_values_reserved_within_the_pending_budget(tls):
    # A rendezvous value is reserved before its bytes arrive; like TCP, such bytes are bounded
    # per connection (and in total): past the budget the value is refused and drained.
    srv = _spawn(tls, extra=("--max-pending-put-bytes-per-connection", "2MiB", "--no-prefault"))
    try:
        c = _ucx(srv)
        big, small = os.urandom(4 * MiB), os.urandom(1 * MiB)
        assert c.put([b"big", b"small"], [big, small]) == [_native.STATUS_NO_SPACE, 0]
        assert c.get([b"small"]) == [small]
        st = c.stats()
        assert st["pending_put_bytes"] == 0 and st["no_space"] >= 1
    finally:
        srv.kill()


def test_a_put_larger_than_the_pending_budget_goes_in_several_frames(tls):
    # 40 x 8 MiB = 320 MiB in one call, above the server's default per-connection budget of
    # pending rendezvous bytes (the largest value: 256 MiB). Sent as one frame, the items past
    # 256 MiB were refused (a fresh vLLM instance then found half an 8000-token prefix); the
    # client now sends at most 256 MiB of values per frame.
    srv = _spawn(tls, capacity="512MiB", extra=("--no-prefault",))
    try:
        c = _ucx(srv, timeout_ms=60000)
        keys = [b"blk%02d" % i for i in range(40)]
        vals = [bytes([i]) * (8 * MiB) for i in range(40)]
        assert c.put(keys, vals) == [0] * 40
        assert c.lookup_prefix(keys) == 40
        assert c.get(keys[-2:]) == vals[-2:]
        assert c.stats()["no_space"] == 0
    finally:
        srv.kill()
