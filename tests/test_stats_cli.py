"""`membrain stats` against real `membrain server` subprocesses: one-shot and --watch tables,
JSON output, rates from two samples, auth through --token-file, the metrics port's /stats, and a
server that cannot be reached shown as down without a traceback."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import membrain
from membrain.client import Client
from membrain.stats_cli import Row, Sample, make_row, metrics_stats_url, render
from membrain.utils.net import free_port

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(membrain.__file__)))


def _stats_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    return subprocess.run(
        [sys.executable, "-m", "membrain", "stats", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _dead_endpoint() -> str:
    # A port that was just free: connecting to it is refused at once.
    return f"tcp://127.0.0.1:{free_port()}"


def _traffic(endpoint: str, token: str | None = None, n: int = 8) -> None:
    c = Client(endpoint, auth_token=token)
    try:
        keys = [f"stats-{i}" for i in range(n)]
        assert all(c.put(keys, [bytes([i]) * 4096 for i in range(n)]))
        oks = c.get(keys + ["absent-1", "absent-2"])
        assert sum(1 for v in oks if v is not None) == n
    finally:
        c.close()


def test_one_shot_table_and_json(server_factory):
    srv = server_factory(capacity="64MiB")
    _traffic(srv.endpoint)
    r = _stats_cli(srv.endpoint, "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[1].split()[:3] == ["SERVER", "STATE", "USED"]
    row = lines[2].split()
    assert row[0] == srv.endpoint and row[1] == "up"
    assert row[3] == "64MiB"  # capacity
    assert row[5] == "8"  # items

    r = _stats_cli(srv.endpoint, "--interval", "0", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (s,) = doc["servers"]
    assert s["up"] and s["server"] == srv.endpoint
    assert s["items"] == 8 and s["capacity_bytes"] == 64 << 20
    assert s["used_bytes"] == 8 * 4096
    assert s["hit_ratio_total"] == pytest.approx(8 / 10)
    assert s["ops_per_s"] is None  # one sample: no rates


def test_rates_from_two_samples(server_factory):
    srv = server_factory(capacity="64MiB")
    c = Client(srv.endpoint)
    try:
        keys = [f"r{i}" for i in range(4)]
        c.put(keys, [b"x" * 1000] * 4)
        before = Sample(0.0, json.loads(json.dumps(c.stats()["endpoints"][srv.endpoint])))
        for _ in range(5):
            c.get(keys + ["nope"])
        after = Sample(2.0, c.stats()["endpoints"][srv.endpoint])
    finally:
        c.close()
    row = make_row(srv.endpoint, after, before)
    assert row.up
    # 5 GETs in 2 s (the STATS polls themselves are not data operations)
    assert row.ops_per_s == pytest.approx(2.5)
    assert row.hit_ratio == pytest.approx(20 / 25)
    assert row.out_bytes_per_s and row.out_bytes_per_s >= 5 * 4 * 1000 / 2
    assert row.evictions_per_s == 0


def test_unreachable_server_is_down_without_traceback(server_factory):
    srv = server_factory(capacity="64MiB")
    dead = _dead_endpoint()
    r = _stats_cli(f"{srv.endpoint},{dead}", "--interval", "0", "--timeout", "1")
    assert r.returncode == 1  # a server is down
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stdout.splitlines()
    down = next(line for line in lines if line.startswith(dead))
    assert down.split()[1] == "down"
    assert "refused" in down.lower()
    up = next(line for line in lines if line.startswith(srv.endpoint))
    assert up.split()[1] == "up"
    assert any(line.startswith("TOTAL (1/2 up)") for line in lines)

    # an unreachable metrics URL too
    r = _stats_cli("--metrics-url", "http://127.0.0.1:" + dead.rsplit(":", 1)[1], "--interval", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert " down " in r.stdout


def test_watch_over_metrics_url(server_factory):
    srv = server_factory(capacity="64MiB", metrics_port=0)
    url = srv.metrics_url
    assert url
    _traffic(srv.endpoint)
    r = _stats_cli("--metrics-url", url, "--watch", "0.3", "--count", "2", "--json")
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) == 2
    for d in docs:
        (s,) = d["servers"]
        assert s["up"] and s["items"] == 8 and s["server"] == url
        assert s["ops_per_s"] == 0  # rates in every --watch table; no traffic meanwhile
    # text mode: a table per refresh
    r = _stats_cli(srv.endpoint, "--watch", "0.2", "--count", "3")
    assert r.returncode == 0 and r.stdout.count("SERVER") == 3


def test_auth_token_file(server_factory, tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    srv = server_factory(capacity="64MiB", extra_args=["--auth-token-file", str(tok)])
    _traffic(srv.endpoint, token="s3cret")
    r = _stats_cli(srv.endpoint, "--token-file", str(tok), "--interval", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["servers"][0]["items"] == 8
    # without the token the server refuses: shown down with the reason, no traceback
    r = _stats_cli(srv.endpoint, "--interval", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert " down " in r.stdout
    r = _stats_cli(srv.endpoint, "--token-file", str(tmp_path / "missing"))
    assert r.returncode != 0 and "cannot read --token-file" in r.stderr


def test_metrics_stats_url_and_render():
    assert metrics_stats_url("http://h:9202") == "http://h:9202/stats"
    assert metrics_stats_url("h:9202/") == "http://h:9202/stats"
    assert metrics_stats_url("https://h/membrain/stats") == "https://h/membrain/stats"
    with pytest.raises(ValueError):
        metrics_stats_url("ftp://h:1")
    text = render([Row("tcp://a:1", False, "cannot connect"), Row("tcp://b:1", True, capacity_bytes=1 << 20)])
    lines = text.splitlines()
    assert lines[1].startswith("tcp://a:1") and "down" in lines[1] and "(cannot connect)" in lines[1]
    assert lines[-1].startswith("TOTAL (1/2 up)")


def test_restarted_server_gets_no_bogus_rates():
    before = Sample(
        0.0, {"uptime_s": 500.0, "hits": 900, "misses": 100, "bytes_in": 10**9, "requests": {"GET": 50}}
    )
    after = Sample(1.0, {"uptime_s": 0.5, "hits": 0, "misses": 0, "bytes_in": 100, "requests": {"GET": 0}})
    row = make_row("tcp://a:1", after, before)
    assert row.up and row.ops_per_s is None and row.in_bytes_per_s is None and row.hit_ratio is None


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c_after_first_table(endpoint: str, watch: str, delay_s: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "membrain", "stats", endpoint, "--watch", watch],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=PKG_PARENT),
        # As from a terminal: a suite started as a background job of a script inherits SIGINT
        # ignored, and `membrain stats` (like any Unix tool) keeps ignoring it then.
        preexec_fn=_default_sigint,
    )
    try:
        assert proc.stdout is not None
        line = "-"
        while line and "SERVER" not in line:  # the first table is out: the loop is running
            line = proc.stdout.readline()
        assert line, "no table before EOF"
        time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_watch_ends_cleanly_on_ctrl_c(server_factory):
    srv = server_factory(capacity="64MiB")
    done = _ctrl_c_after_first_table(srv.endpoint, "0.2", 0.0)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def test_watch_ends_on_ctrl_c_that_lands_mid_poll(server_factory):
    # Polls back to back (--watch 0.001), so Ctrl-C lands at random points of the loop,
    # mostly while the main thread waits on the thread pool's futures.
    srv = server_factory(capacity="64MiB")
    rng = random.Random(7)
    for _ in range(12):
        done = _ctrl_c_after_first_table(srv.endpoint, "0.001", rng.uniform(0.0, 0.05))
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
