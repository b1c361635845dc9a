"""`membrain server` as a subprocess: READY line, HTTP metrics, SIGTERM drain, option errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from wire import OK, WireClient

import membrain
from membrain.server import spawn_server
from membrain.utils.sizes import format_size, parse_size

# The directory holding the membrain package under test (installed or built in place).
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(membrain.__file__)))


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    return subprocess.run(
        [sys.executable, "-m", "membrain", "server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_parse_and_format_size():
    assert parse_size("256MiB") == 256 << 20
    assert parse_size("64GiB") == 64 << 30
    assert parse_size("1.5 KiB") == 1536
    assert parse_size("2g") == 2 << 30
    assert parse_size("10MB") == 10 << 20
    assert parse_size("4096") == 4096
    assert parse_size(7) == 7
    for bad in ("", "MiB", "12XB", "-1", "1.0000001B", "1e9", "ten"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)
    assert format_size(64 << 30) == "64GiB" and format_size(1536) == "1.5KiB" and format_size(10) == "10B"
    for n in (1, 1023, 1 << 20, 3 << 30, 5 << 40):
        assert parse_size(format_size(n)) == n


def test_help_documents_every_option():
    r = _run_cli("--help")
    assert r.returncode == 0
    for opt in (
        "--host",
        "--port",
        "--capacity",
        "--metrics-port",
        "--threads",
        "--max-connections",
        "--idle-timeout",
        "--ttl",
        "--auth-token-file",
        "--log-level",
        "--metrics-host",
        "--max-pending-put-bytes",
        "--max-pending-put-bytes-per-connection",
        "--eviction-policy",
        "--namespace-priority",
    ):
        assert opt in r.stdout, opt


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--capacity", "lots"], "invalid size"),
        (["--port", "70000"], "out of range"),
        (["--threads", "0"], "must be >= 1"),
        (["--capacity", "1KiB", "--port", "0", "--metrics-port", "-1"], "64 KiB minimum"),
        (["--auth-token-file", "/nonexistent/token", "--port", "0"], "cannot read --auth-token-file"),
        (["--eviction-policy", "fifo"], "invalid choice"),
        (["--namespace-priority", "sys=9"], "0..3"),
        (["--namespace-priority", "sys"], "PATTERN=N"),
    ],
)
def test_bad_options_fail_clearly(args, needle):
    r = _run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("flag", ["--idle-timeout", "--ttl"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e10"])
def test_non_finite_or_huge_seconds_are_refused(flag, value):
    # Each became int64 nanoseconds through an undefined float-to-int cast and was accepted.
    r = _run_cli(f"{flag}={value}", "--port", "0", "--metrics-port", "-1")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert flag in r.stderr and ("finite" in r.stderr or "maximum" in r.stderr or ">= 0" in r.stderr), (
        r.stderr
    )


def test_in_process_server_refuses_non_finite_seconds():
    from membrain.server import Server

    for kw in ({"idle_timeout": float("nan")}, {"idle_timeout": 1e10}, {"ttl": float("inf")}):
        with pytest.raises(ValueError, match="finite number of seconds"):
            Server(port=0, capacity="1MiB", prefault=False, **kw)


def test_token_file_not_utf8_exits_2_with_a_message(tmp_path):
    tok = tmp_path / "token"
    tok.write_bytes(b"\xff\xfe secret \x80")
    r = _run_cli("--auth-token-file", str(tok), "--port", "0", "--metrics-port", "-1")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "not UTF-8" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_spawn_metrics_and_sigterm(tmp_path):
    srv = spawn_server(capacity="32MiB", metrics_port=0, extra_args=["--log-level", "WARNING"])
    try:
        assert srv.endpoint.startswith("tcp://127.0.0.1:") and srv.metrics_url.startswith("http://127.0.0.1:")
        with WireClient(srv.port) as c:
            assert c.put([(b"k", b"v" * 1000)]) == [OK]
            assert c.get([b"k", b"miss"]) == [b"v" * 1000, None]
        assert urllib.request.urlopen(srv.metrics_url + "/healthz", timeout=5).read() == b"ok\n"
        text = urllib.request.urlopen(srv.metrics_url + "/metrics", timeout=5).read().decode()
        for name in (
            "membrain_stored_bytes 1000.0",
            'membrain_requests_total{op="PUT"} 1.0',
            "membrain_hits_total 1.0",
            "membrain_misses_total 1.0",
            "membrain_evictions_total 0.0",
            "membrain_capacity_bytes",
            "membrain_fragmentation_ratio",
        ):
            assert name in text, name
        stats = json.loads(urllib.request.urlopen(srv.metrics_url + "/stats", timeout=5).read())
        assert stats["items"] == 1 and stats["used_bytes"] == 1000
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_in_flight_reply():
    srv = spawn_server(capacity="64MiB", extra_args=["--log-level", "WARNING"])
    big = os.urandom(8 << 20)
    with WireClient(srv.port) as c:
        c.put([(b"big", big)])
        c.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536)
        from wire import GET, keys_frame, parse_get

        c.send(keys_frame(GET, [b"big"], rid=9))
        time.sleep(0.2)
        srv.process.send_signal(signal.SIGTERM)
        f = c.recv_frame()  # the queued reply still arrives whole
        assert f.request_id == 9 and parse_get(f.payload, 1) == [big]
    assert srv.process.wait(20) == 0


def test_sigint_exits_zero_and_auth_file(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("hunter2\n")
    srv = spawn_server(extra_args=["--auth-token-file", str(tok), "--log-level", "WARNING"])
    with WireClient(srv.port) as c:
        assert c.hello(b"default", b"hunter2").status == OK
    srv.process.send_signal(signal.SIGINT)
    assert srv.process.wait(20) == 0


def test_port_in_use_fails(tmp_path):
    srv = spawn_server(extra_args=["--log-level", "WARNING"])
    try:
        r = _run_cli("--port", str(srv.port), "--metrics-port", "-1")
        assert r.returncode == 2 and "cannot listen" in r.stderr
    finally:
        srv.stop()


def _proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def test_idle_metrics_connections_are_bounded():
    # Each HTTP connection held a thread and an fd with no timeout: 253 idle connections to
    # /stats took the data plane down. Now at most 16 are served, each for at most 5 s idle.
    srv = spawn_server(
        capacity="8MiB", metrics_port=0, extra_args=["--no-prefault", "--log-level", "WARNING"]
    )
    host, port = srv.metrics_url.removeprefix("http://").rsplit(":", 1)
    idle = []
    try:
        threads_before = _proc_status(srv.pid, "Threads")
        fds_before = len(os.listdir(f"/proc/{srv.pid}/fd"))
        for _ in range(300):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(0.5)
        assert _proc_status(srv.pid, "Threads") <= threads_before + 20
        assert len(os.listdir(f"/proc/{srv.pid}/fd")) <= fds_before + 20
        with WireClient(srv.port) as c:  # the data plane is unaffected
            assert c.put([(b"k", b"v")]) == [OK] and c.get([b"k"]) == [b"v"]
        deadline = time.monotonic() + 15  # the idle ones time out; metrics answer again
        while True:
            try:
                assert urllib.request.urlopen(srv.metrics_url + "/healthz", timeout=2).read() == b"ok\n"
                break
            except OSError:
                assert time.monotonic() < deadline, "metrics never came back"
                time.sleep(0.5)
    finally:
        for s in idle:
            s.close()
        assert srv.stop() == 0


def test_metrics_require_the_token_and_listen_on_loopback(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("hunter2\n")
    srv = spawn_server(
        host="0.0.0.0",
        metrics_port=0,
        extra_args=["--auth-token-file", str(tok), "--no-prefault", "--log-level", "WARNING"],
    )
    try:
        assert srv.metrics_url.startswith("http://127.0.0.1:")  # --metrics-host, not --host
        assert urllib.request.urlopen(srv.metrics_url + "/healthz", timeout=5).read() == b"ok\n"
        for path in ("/metrics", "/stats"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.metrics_url + path, timeout=5)
            assert e.value.code == 401
            for bad in ("Bearer hunter", "hunter2", "Basic aHVudGVyMg=="):
                req = urllib.request.Request(srv.metrics_url + path, headers={"Authorization": bad})
                with pytest.raises(urllib.error.HTTPError):
                    urllib.request.urlopen(req, timeout=5)
            req = urllib.request.Request(srv.metrics_url + path, headers={"Authorization": "Bearer hunter2"})
            assert urllib.request.urlopen(req, timeout=5).status == 200
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("policy", ["lru", "slru"])
def test_eviction_policy_flag_and_evictions_by_reason(policy):
    # 8 MiB: a few slabs of 256 KiB values. A value in the priority namespace and one read again
    # survive a scan of one-off values; /metrics says which policy runs and why it evicted.
    srv = spawn_server(
        capacity="8MiB",
        metrics_port=0,
        extra_args=[
            "--no-prefault",
            "--log-level",
            "WARNING",
            "--eviction-policy",
            policy,
            "--namespace-priority",
            "sys*=2",
        ],
    )
    try:
        value = b"v" * (256 << 10)
        with WireClient(srv.port) as c:
            c.hello(b"system")
            assert c.put([(b"prompt", value)]) == [OK]
        with WireClient(srv.port) as c:
            assert c.put([(b"hot", value)]) == [OK]
            for i in range(100):
                assert c.put([(f"scan{i}".encode(), value)]) == [OK]
                if policy == "lru" or i == 0:
                    assert c.get([b"hot"]) == [value]  # LRU needs it kept recent; SLRU one re-read
            assert c.get([b"hot"]) == [value]
        with WireClient(srv.port) as c:
            c.hello(b"system")
            assert c.get([b"prompt"]) == [value]
        text = urllib.request.urlopen(srv.metrics_url + "/metrics", timeout=5).read().decode()
        assert f'membrain_eviction_policy{{policy="{policy}"}} 1.0' in text, text
        by = {
            reason: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            for reason in ("probation", "protected", "priority")
            if line.startswith(f'membrain_evictions_by_reason_total{{reason="{reason}"}}')
        }
        assert by["probation"] > 0 and by["priority"] == 0, by
        stats = json.loads(urllib.request.urlopen(srv.metrics_url + "/stats", timeout=5).read())
        assert stats["eviction_policy"] == policy
        assert stats["evictions"] == sum(stats["evictions_by_reason"].values())
    finally:
        assert srv.stop() == 0
