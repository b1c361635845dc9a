"""`membrain bench transfer` end to end at smoke size: it spawns a real server, moves real bytes
(its GET step compares them with what was PUT) and writes the result files the README quotes.
Figures are not judged here (benchmarks, not timed tests); the shape and sanity of what is
written are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from membrain import _native
from membrain.bench.machine import machine_info, machine_tag


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # A small server on purpose: 8 read-back batches of 16 x 1 MiB per connection would not fit
    # in 256 MiB with 4 connections, so this also checks that the benchmark sizes its GET working
    # set to the server (misses would show as failures below).
    cmd = [
        sys.executable,
        "-m",
        "membrain",
        "bench",
        "transfer",
        "--capacity-gib",
        "0.25",
        "--results-dir",
        str(tmp_path),
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_tcp_smoke_writes_named_results(tmp_path: Path) -> None:
    extra = tmp_path / "copy.json"
    r = _bench(
        tmp_path,
        "--quick",
        "--seconds",
        "0.2",
        "--no-redis",
        "--no-loopback",
        "--accept-rounds",
        "1",
        "--json",
        str(extra),
    )
    path = tmp_path / f"transfer_tcp_{machine_tag(machine_info())}.json"
    assert f"results: {path}" in r.stdout
    d = json.loads(path.read_text())
    assert json.loads(extra.read_text()) == d
    assert d["transport"] == "tcp" and d["machine"]["cpu_cores"] >= 1
    ops = {(p["op"], p["size"], p["batch"], p["conns"]) for p in d["points"]}
    assert {("PUT", 1 << 20, 16, 4), ("PUT*", 1 << 20, 16, 4), ("GET", 1 << 20, 16, 4)} <= ops
    for p in d["points"]:
        assert p["failures"] == 0 and p["calls"] > 0 and p["gbps"] > 0, p
        assert 0 < p["p50_ms"] <= p["p99_ms"], p
    lk = d["lookup_prefix"]
    assert len(lk["rounds"]) == 1 and 0 < lk["p50_ms"] <= lk["p99_ms"] <= lk["p99_ms_max"]
    # No baselines were measured, so no verdict may claim them.
    acc = d["acceptance"]
    assert acc["put_get_ge_0.7x_loopback"] is None and acc["put_get_ge_1.3x_redis"] is None
    assert [row["conns"] for row in d["acceptance_paired"]] == [1, 4]


@pytest.mark.skipif(
    not _native.native_info().get("ucx"), reason="UCX transport not built in this installation"
)
def test_ucx_smoke_compares_with_tcp(tmp_path: Path) -> None:
    _bench(tmp_path, "--transport", "ucx", "--seconds", "0.4", "--accept-rounds", "1")
    d = json.loads((tmp_path / f"transfer_ucx_{machine_tag(machine_info())}.json").read_text())
    assert [row["conns"] for row in d["ucx_vs_tcp"]] == [1, 4]
    for row in d["ucx_vs_tcp"]:
        for tr in ("tcp", "ucx"):
            for op in ("PUT", "PUT*", "GET"):
                assert row[f"{tr}_{op}_gbps"] > 0, row
    assert d["ucx_err_mode"] in ("peer", "none") and d["ucx_lanes"]


def test_redis_cluster_backends_smoke(tmp_path: Path) -> None:
    """--redis-cluster: a local 3-master cluster, a standalone redis-server and a Membrain server
    side by side; every backend moved bytes and the JSON carries the verdict."""
    from membrain.bench.redis_local import have_redis

    if not have_redis():
        pytest.skip("redis-server / redis-cli not installed")
    pytest.importorskip("redis")
    r = _bench(tmp_path, "--redis-cluster", "--rounds", "1", "--seconds", "0.2")
    path = tmp_path / f"transfer_backends_{machine_tag(machine_info())}.json"
    assert f"results: {path}" in r.stdout
    d = json.loads(path.read_text())["backends"]
    assert d["batch"] == 16 and d["size"] == 1 << 20 and len(d["rounds"]) == 1
    for name in ("membrain", "redis_cluster_backend", "redis_py_pipelined", "redis_py_cluster_pipelined"):
        assert d["median"][name]["PUT"] > 0 and d["median"][name]["GET"] > 0, name
    assert set(d["cluster_ge_1.3x_redis_py"]) == {"PUT", "GET"}
