"""Authentication, namespaces, connection limits and timeouts."""

from __future__ import annotations

import socket
import time

from server_fixtures import make_server  # noqa: F401
from wire import GET, OK, PING, UNAUTHORIZED, WireClient, header, keys_frame


def test_auth_required_before_anything(make_server):
    s = make_server(auth_token="s3cret")
    with WireClient(s.port) as c:
        f = c.call(keys_frame(GET, [b"k"], rid=3))
        assert f.status == UNAUTHORIZED and f.request_id == 3
        c.expect_closed()
    with WireClient(s.port) as c:
        f = c.hello(b"default", b"wrong")
        assert f.status == UNAUTHORIZED
        c.expect_closed()
    with WireClient(s.port) as c:
        f = c.hello(b"default", b"s3cre")  # prefix of the token
        assert f.status == UNAUTHORIZED
    with WireClient(s.port) as c:
        assert c.hello(b"default", b"s3cret").status == OK
        assert c.put([(b"k", b"v")]) == [OK]
        assert c.get([b"k"]) == [b"v"]
    assert s.stats()["auth_failures"] == 3


def test_no_auth_accepts_any_token(make_server):
    s = make_server()
    with WireClient(s.port) as c:
        assert c.hello(b"ns", b"whatever").status == OK
        assert c.ping(b"x") == b"x"


def test_namespaces_are_isolated(make_server):
    s = make_server()
    with WireClient(s.port) as a, WireClient(s.port) as b, WireClient(s.port) as d:
        a.hello(b"tenant-a")
        b.hello(b"tenant-b")
        a.put([(b"same-key", b"A" * 100)])
        b.put([(b"same-key", b"B" * 100)])
        assert a.get([b"same-key"]) == [b"A" * 100]
        assert b.get([b"same-key"]) == [b"B" * 100]
        assert d.get([b"same-key"]) == [None]  # "default" namespace
        assert b.delete([b"same-key"]) == 1
        assert a.get([b"same-key"]) == [b"A" * 100]
        assert a.lookup_prefix([b"same-key"]) == 1 and b.lookup_prefix([b"same-key"]) == 0


def test_max_connections(make_server):
    s = make_server(max_connections=3)
    held = [WireClient(s.port) for _ in range(3)]
    for c in held:
        assert c.ping(b"1") == b"1"
    extra = WireClient(s.port)
    extra.sock.settimeout(5)
    try:
        extra.send(header(PING, 1))
        assert extra.sock.recv(100) == b""  # accepted, then closed
    except (ConnectionResetError, BrokenPipeError):
        pass
    extra.close()
    assert s.stats()["connections_rejected"] >= 1
    held[0].close()
    time.sleep(0.2)
    with WireClient(s.port) as c:  # a slot freed up
        assert c.ping(b"2") == b"2"
    for c in held[1:]:
        assert c.ping(b"3") == b"3"
        c.close()


def test_idle_timeout(make_server):
    s = make_server(idle_timeout=0.5)
    with WireClient(s.port) as c:
        assert c.ping(b"x") == b"x"
        t0 = time.time()
        c.expect_closed(timeout=5)
        assert 0.4 < time.time() - t0 < 3
    assert s.stats()["timeouts"] >= 1


def test_slow_loris_frame_deadline(make_server):
    """Dribbling a frame a byte at a time keeps the socket busy but must not keep it open."""
    s = make_server(idle_timeout=0.6)
    frame = keys_frame(GET, [b"k" * 100] * 20)
    sock = socket.create_connection(("127.0.0.1", s.port))
    t0 = time.time()
    closed = False
    try:
        for b in frame:
            sock.send(bytes([b]))
            time.sleep(0.05)
            if time.time() - t0 > 3:
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    if not closed:
        sock.settimeout(2)
        try:
            closed = sock.recv(100) == b""
        except (TimeoutError, ConnectionResetError):
            closed = True
    sock.close()
    assert closed and time.time() - t0 < 3.5
    with WireClient(s.port) as c:
        assert c.ping(b"ok") == b"ok"
