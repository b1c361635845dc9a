"""Authentication, namespaces, connection limits and timeouts."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap
import time

import pytest
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


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_EMFILE_CHILD = textwrap.dedent("""
    import os, resource, sys, time
    from membrain.server import Server
    s = Server(port=0, capacity="1MiB", prefault=False, threads=1, max_connections=1000).start()
    # Only a few descriptors left: connections beyond them make accept() fail with EMFILE.
    n_open = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (n_open + 6, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(s.port, flush=True)
    sys.stdin.readline()
    print(s.stats()["accept_pauses"], s.stats()["connections_rejected"], flush=True)
""")


def test_out_of_fds_pauses_accepting_and_sheds_queued_clients():
    # accept4() failing with EMFILE left the level-triggered listener ready: the worker spun at
    # 100 % CPU and the clients queued behind it hung until fds came back.
    child = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    socks = []
    try:
        port = int(child.stdout.readline())
        for _ in range(30):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.3)
        cpu0 = _cpu_seconds(child.pid)
        time.sleep(1.0)
        used = _cpu_seconds(child.pid) - cpu0
        assert used < 0.3, f"server used {used:.2f} s of CPU in 1 s while out of fds"
        # Every client either is served or learns at once that it was not: none hangs.
        hung = 0
        for s in socks:
            s.settimeout(3)
            try:
                s.sendall(header(PING, 1))
                data = s.recv(100)
                assert data == b"" or len(data) >= 40
            except (ConnectionResetError, BrokenPipeError):
                pass
            except TimeoutError:
                hung += 1
        assert hung == 0, f"{hung} clients hung"
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(0.5)
        with WireClient(port) as c:  # fds are back: served again
            assert c.ping(b"back") == b"back"
        child.stdin.write("\n")
        child.stdin.flush()
        pauses, rejected = map(int, child.stdout.readline().split())
        assert pauses >= 1 and rejected >= 1
    finally:
        for s in socks:
            s.close()
        child.kill()
        child.wait()


def test_max_connections_fitted_to_the_open_files_limit():
    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 300))

    proc = subprocess.Popen(
        [sys.executable, "-m", "membrain", "server", "--port", "0", "--metrics-port", "-1", "--no-prefault"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_fds,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    try:
        assert proc.stdout.readline().startswith("MEMBRAIN SERVER READY")
        with open(f"/proc/{proc.pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        assert line.split()[3:5] == ["300", "300"], line  # soft raised to hard
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "--max-connections 1024 lowered to" in err and "RLIMIT_NOFILE soft 300, hard 300" in err, err
    kept = int(err.split("lowered to ")[1].split()[0])
    assert 1 <= kept < 300


def test_unread_replies_past_the_limit_close_the_connection(make_server):
    # A client that pipelines GETs and never reads pinned their values until the slow-reader
    # timeout; past --max-reply-bytes-per-connection it is closed (the pins go with it).
    s = make_server(capacity="64MiB", max_reply_bytes_per_connection=4 << 20, socket_buffer_bytes=65536)
    with WireClient(s.port) as w:
        assert w.put([(b"v%d" % i, os.urandom(1 << 20)) for i in range(8)]) == [OK] * 8
    c = WireClient(s.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.send(keys_frame(GET, [b"v%d" % i for i in range(8)], rid=1))  # 8 MiB reply, never read
    time.sleep(0.5)
    c.expect_closed(timeout=5)
    c.close()
    assert s.stats()["reply_limit_closes"] == 1
    with WireClient(s.port) as d:  # small replies are unaffected
        assert d.get([b"v0"])[0] is not None


def test_unauthenticated_connection_has_a_deadline(make_server):
    s = make_server(auth_token="s3cret", auth_timeout=0.5, idle_timeout=60)
    with WireClient(s.port) as idle, WireClient(s.port) as good:
        assert good.hello(b"default", b"s3cret").status == OK
        t0 = time.time()
        idle.expect_closed(timeout=5)  # never said HELLO: closed after the deadline, not 60 s
        assert 0.4 < time.time() - t0 < 3
        time.sleep(0.6)
        assert good.ping(b"x") == b"x"  # authenticated connections are not affected


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_protected_mode_refuses_non_loopback_without_token(host, tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "membrain", "server", "--port", "0", "--no-prefault", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )

    r = cli("--host", host, "--metrics-port", "-1")
    assert r.returncode == 2 and "without authentication" in r.stderr and "--insecure" in r.stderr, r.stderr
    r = cli("--metrics-host", host, "--metrics-port", "0")
    assert r.returncode == 2 and "--metrics-host" in r.stderr, r.stderr
    # With --insecure, or with a token, it starts.
    from membrain.server import spawn_server

    srv = spawn_server(host=host, extra_args=["--insecure", "--no-prefault"])
    assert srv.stop() == 0
    tok = tmp_path / "t"
    tok.write_text("x")
    srv = spawn_server(host=host, extra_args=["--auth-token-file", str(tok), "--no-prefault"])
    assert srv.stop() == 0


def test_per_namespace_tokens(make_server):
    s = make_server(tokens={"tok-a": ["tenant-a", "shared-*"], "tok-b": ["tenant-b"], "admin": ["*"]})
    with WireClient(s.port) as a:
        assert a.hello(b"tenant-a", b"tok-a").status == OK
        assert a.put([(b"k", b"A" * 100)]) == [OK]
        assert a.hello(b"shared-x", b"tok-a").status == OK  # a pattern match
        assert a.put([(b"k", b"S" * 10)]) == [OK]
    for ns, tok in ((b"tenant-b", b"tok-a"), (b"tenant-a", b"tok-b"), (b"shared", b"tok-a"), (b"x", b"nope")):
        with WireClient(s.port) as c:  # a valid token only reaches its own namespaces
            assert c.hello(ns, tok).status == UNAUTHORIZED, (ns, tok)
            c.expect_closed()
    with WireClient(s.port) as b:
        assert b.hello(b"tenant-b", b"tok-b").status == OK
        b.put([(b"k1", b"B" * 7), (b"k2", b"")])
        assert b.get([b"k"]) == [None]  # tenant-a's key is not visible here
        st = b.stats()  # a scoped token sees its namespace only
        assert st["namespace"] == "tenant-b" and st["items"] == 2 and st["used_bytes"] == 7
        assert st["misses"] == 1 and st["puts"] == 2 and "bytes_in" not in st
    with WireClient(s.port) as adm:
        assert adm.hello(b"tenant-a", b"admin").status == OK
        st = adm.stats()  # everything
        assert st["items"] == 4 and "bytes_in" in st
    per_ns = s.namespace_stats()
    assert {k: v["items"] for k, v in per_ns.items()} == {"tenant-a": 1, "shared-x": 1, "tenant-b": 2}


def test_token_file_maps_tokens_to_namespaces(tmp_path):
    import json
    import urllib.error
    import urllib.request

    from membrain.server import spawn_server

    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps({"tokens": {"tok-a": ["tenant-a"], "admin": ["*"]}}))
    srv = spawn_server(metrics_port=0, extra_args=["--auth-token-file", str(tok), "--no-prefault"])
    try:
        with WireClient(srv.port) as c:
            assert c.hello(b"tenant-a", b"tok-a").status == OK
            assert c.put([(b"k", b"v" * 10)]) == [OK]
        with WireClient(srv.port) as c:
            assert c.hello(b"tenant-b", b"tok-a").status == UNAUTHORIZED

        def get(path, token):
            req = urllib.request.Request(srv.metrics_url + path, headers={"Authorization": f"Bearer {token}"})
            return urllib.request.urlopen(req, timeout=5)

        import json as js

        mine = js.loads(get("/stats", "tok-a").read())
        assert mine == {"namespaces": {"tenant-a": mine["namespaces"]["tenant-a"]}}
        assert mine["namespaces"]["tenant-a"]["items"] == 1
        with pytest.raises(urllib.error.HTTPError) as e:
            get("/metrics", "tok-a")
        assert e.value.code == 403
        assert "items" in js.loads(get("/stats", "admin").read())
        assert get("/metrics", "admin").status == 200
    finally:
        assert srv.stop() == 0
    bad = tmp_path / "bad.json"
    for text in ('{"tokens": {"t": []}}', '{"tokens": [1]}', "{not json"):
        bad.write_text(text)
        r = subprocess.run(
            [sys.executable, "-m", "membrain", "server", "--port", "0", "--auth-token-file", str(bad)],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
        assert r.returncode == 2 and "--auth-token-file" in r.stderr and "Traceback" not in r.stderr, r.stderr
