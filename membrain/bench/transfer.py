"""`membrain bench transfer`: PUT/GET bandwidth of the Membrain TCP transport, measured side by
side (same run, same machine) with the loopback TCP limit (iperf3, or a Python socket pair) and
with Redis (`redis-server` + `redis-benchmark`) at the same value size and connection count.

Only ratios measured in one run mean anything on a shared machine; absolute figures are noisy.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from membrain.bench.machine import machine_info, machine_tag
from membrain.utils.net import free_port

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


# ---------------------------------------------------------------------------- Membrain


@dataclass
class Point:
    op: str
    size: int
    batch: int
    conns: int
    gbps: float
    ops_s: float  # values per second
    p50_ms: float
    p99_ms: float
    calls: int
    failures: int = 0
    vs_loopback: float | None = None
    vs_redis: float | None = None


class _Barrier:
    """Start all workers together and stop them together after `seconds`."""

    def __init__(self, n: int) -> None:
        self.start = threading.Barrier(n + 1)
        self.stop = threading.Event()


def _timed_point(
    op: str, size: int, batch: int, conns: int, run: tuple[float, int, list[float], int, int]
) -> Point:
    """A Point from ``_run_workers``' (wall s, bytes moved, latencies s, calls, failures)."""
    wall, moved, lat, calls, fails = run
    return Point(
        op,
        size,
        batch,
        conns,
        moved / wall / 1e9,
        moved / size / wall,
        _pct(lat, 50) * 1e3,
        _pct(lat, 99) * 1e3,
        calls,
        fails,
    )


def _run_workers(
    conns: int,
    seconds: float,
    body: Callable[[int, Any], Callable[[], tuple[int, bool]]],
    make_client: Callable[[], Any],
) -> tuple[float, int, list[float], int, int]:
    """Each worker thread has its own client; `body(worker, client)` returns a step function
    that does one call and returns (bytes moved, ok). Returns wall seconds, bytes, latencies,
    calls, failures."""
    bar = _Barrier(conns)
    lat: list[list[float]] = [[] for _ in range(conns)]
    moved = [0] * conns
    fails = [0] * conns
    clients = [make_client() for _ in range(conns)]
    steps = [body(w, clients[w]) for w in range(conns)]

    def work(w: int) -> None:
        step = steps[w]
        bar.start.wait()
        while not bar.stop.is_set():
            t0 = time.perf_counter()
            n, ok = step()
            lat[w].append(time.perf_counter() - t0)
            moved[w] += n
            fails[w] += 0 if ok else 1

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(conns)]
    for t in threads:
        t.start()
    bar.start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    bar.stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    all_lat = [x for xs in lat for x in xs]
    return wall, sum(moved), all_lat, len(all_lat), sum(fails)


def bench_membrain(
    endpoint: str, size: int, batch: int, conns: int, seconds: float, timeout_ms: int, run_id: str
) -> list[Point]:
    import membrain

    def make_client() -> Any:
        return membrain.Client(endpoint, timeout_ms=timeout_ms, namespace="bench")

    # One contiguous source region per worker, sliced into `batch` values (views, no copies).
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 256, size * batch, dtype=np.uint8) for _ in range(conns)]
    dst = [np.empty(size * batch, dtype=np.uint8) for _ in range(conns)]
    for d in dst:
        # Touch the destination pages now: first-touch page faults (numpy asks for huge pages
        # on large arrays, and THP compaction is slow here) would otherwise dominate the
        # first GETs of a one-second window and be charged to the transport.
        d.fill(0)
    views = [[s.data[i * size : (i + 1) * size] for i in range(batch)] for s in src]
    dviews = [[d.data[i * size : (i + 1) * size] for i in range(batch)] for d in dst]
    written: list[list[list[str]]] = [[] for _ in range(conns)]
    # GET reads back up to 8 of the batches PUT wrote (PUT* rewrites them just before), so the
    # working set is conns x sets x batch x size; keep it within half the server's capacity or
    # eviction turns the GET into misses (4 MiB x 64 x 8 connections is 2 GiB per set).
    capacity = _server_capacity(endpoint, timeout_ms)
    max_sets = max(1, min(8, capacity // 2 // (conns * batch * size))) if capacity else 8

    def put_body(w: int, client: Any) -> Callable[[], tuple[int, bool]]:
        it = [0]

        def step() -> tuple[int, bool]:
            keys = [f"{run_id}-{size}-{batch}-{conns}-{w}-{it[0]}-{j}" for j in range(batch)]
            it[0] += 1
            ok = client.put(keys, views[w])
            if len(written[w]) < max_sets:
                written[w].append(keys)
            return size * sum(ok), all(ok)

        return step

    out = [_timed_point("PUT", size, batch, conns, _run_workers(conns, seconds, put_body, make_client))]

    # PUT* rewrites the same few key sets: the server's memory for them is already faulted in,
    # which separates the transport from first-touch page-fault cost on the server.
    def reput_body(w: int, client: Any) -> Callable[[], tuple[int, bool]]:
        it = [0]
        sets = written[w] or [[f"reput-{w}-{j}" for j in range(batch)]]

        def step() -> tuple[int, bool]:
            keys = sets[it[0] % len(sets)]
            it[0] += 1
            ok = client.put(keys, views[w])
            return size * sum(ok), all(ok)

        return step

    run = _run_workers(conns, seconds, reput_body, make_client)
    out.append(_timed_point("PUT*", size, batch, conns, run))

    def get_body(w: int, client: Any) -> Callable[[], tuple[int, bool]]:
        it = [0]
        sets = written[w] or [[f"absent-{j}" for j in range(batch)]]

        def step() -> tuple[int, bool]:
            keys = sets[it[0] % len(sets)]
            it[0] += 1
            ok = client.get_into(keys, dviews[w])
            return size * sum(ok), all(ok)

        return step

    run = _run_workers(conns, seconds, get_body, make_client)
    out.append(_timed_point("GET", size, batch, conns, run))
    fails = run[4]
    # Spot-check the bytes of one worker's last GET.
    if fails == 0 and written[0]:
        import membrain

        with membrain.Client(endpoint, timeout_ms=timeout_ms, namespace="bench") as c:
            check = np.empty(size * batch, dtype=np.uint8)
            cv = [check.data[i * size : (i + 1) * size] for i in range(batch)]
            if all(c.get_into(written[0][0], cv)) and not np.array_equal(check, src[0]):
                raise AssertionError("GET returned different bytes than were PUT")
    return out


@functools.cache
def _server_capacity(endpoint: str, timeout_ms: int) -> int:
    """The server's capacity in bytes (asked once per endpoint; 0 if it does not say)."""
    import membrain

    with membrain.Client(endpoint, timeout_ms=timeout_ms, namespace="bench") as c:
        return int(c.stats().get("capacity_bytes", 0))


def paired_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median, min and max of each paired ratio over the acceptance rounds, per op and
    connection count. On a shared VM a burst of load can hit one window of a pair and not the
    other; the median over rounds is the robust figure, the extremes show the spread."""
    out: dict[str, dict[str, Any]] = {}
    for conns in sorted({r["conns"] for r in rows}):
        for op in ("PUT", "PUT*", "GET"):
            cells = [r[op] for r in rows if r["conns"] == conns and op in r]
            loop = [c["vs_loopback"] for c in cells if c.get("vs_loopback")]
            red = [c["vs_redis"] for c in cells if c.get("vs_redis")]
            if not loop:
                continue

            def stat(xs: list[float]) -> dict[str, float]:
                return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

            out[f"{op} c{conns}"] = {
                "rounds": len(cells),
                "vs_loopback": stat(loop),
                "vs_redis": stat(red) if red else None,
            }
    return out


def bench_lookup(endpoint: str, iters: int, timeout_ms: int, rounds: int = 5) -> dict[str, Any]:
    """LOOKUP_PREFIX of 64 keys (all present) on an otherwise idle server, one connection:
    `rounds` rounds of `iters` calls, each round through membrain.Client and then through the
    raw native connection (to separate Python client overhead from the round trip). The
    headline p50/p99 are medians over the rounds, so one burst of noise from other tenants of a
    shared machine moves one round, not the verdict; every round's figures are kept."""
    import membrain
    from membrain import _native

    per_round: list[dict[str, float]] = []
    with membrain.Client(endpoint, timeout_ms=timeout_ms, namespace="bench-lookup") as c:
        keys = [f"chain-{i:04d}".encode() for i in range(64)]
        assert all(c.put(keys, [b"x" * 64] * 64))
        conn = _native.Connection(c.endpoints[0].host, c.endpoints[0].port, namespace="bench-lookup")
        try:
            for _ in range(50):
                c.lookup_prefix(keys)
            for _ in range(rounds):
                lat, raw = [], []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    n = c.lookup_prefix(keys)
                    lat.append(time.perf_counter() - t0)
                    assert n == 64, n
                for _ in range(iters):
                    t0 = time.perf_counter()
                    conn.lookup_prefix(keys)
                    raw.append(time.perf_counter() - t0)
                per_round.append(
                    {
                        "p50_ms": _pct(lat, 50) * 1e3,
                        "p99_ms": _pct(lat, 99) * 1e3,
                        "native_p50_ms": _pct(raw, 50) * 1e3,
                        "native_p99_ms": _pct(raw, 99) * 1e3,
                    }
                )
        finally:
            conn.close()
    med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
    return {
        "keys": 64,
        "iters": iters,
        "rounds": per_round,
        **med,
        "p99_ms_max": max(r["p99_ms"] for r in per_round),
    }


MIXED_SIZES = (1, 4 << 10, 64 << 10, MiB, 3_000_001)


def bench_mixed_fill(capacity: int = 256 * MiB, seed: int = 7) -> dict[str, Any]:
    """Capacity use with mixed value sizes: a fresh in-process server of `capacity` (no
    prefault) is filled with values of 1 B, 4 KiB, 64 KiB, 1 MiB and 3,000,001 B in random order,
    one PUT each, until its first eviction, then to twice its capacity. Reports the live fraction
    of capacity at the first eviction (the target is >= 0.9), the live fraction at the end, the
    oldest position (in capacity units back from the newest write) of a missing value, and the
    PUT rate. In-process, so it never touches a server given with --endpoint."""
    import random

    import membrain
    from membrain.server import Server

    rng = random.Random(seed)
    blobs = {n: os.urandom(n) for n in MIXED_SIZES}
    with Server(port=0, capacity=capacity, prefault=False, threads=1) as srv:
        cap = srv.stats()["capacity_bytes"]
        written: list[tuple[bytes, int]] = []
        first: float | None = None
        t0 = time.perf_counter()
        with membrain.Client(srv.endpoint, namespace="bench-mixed") as c:
            total = 0
            while total < 2 * cap:
                n = rng.choice(MIXED_SIZES)
                key = b"mixed-%d" % len(written)
                assert c.put([key], [blobs[n]]) == [True]
                written.append((key, n))
                if first is None and srv.stats()["evictions"]:
                    first = total / cap
                total += n
            secs = time.perf_counter() - t0
            present = c.exists([k for k, _ in written])
        newer, newest_missing = 0, None
        for (_, n), ok in zip(reversed(written), reversed(present)):
            newer += n
            if not ok:
                newest_missing = newer / cap
                break
        st = srv.stats()
    return {
        "capacity_bytes": cap,
        "sizes": list(MIXED_SIZES),
        "live_fraction_at_first_eviction": first,
        "live_fraction_at_end": st["used_bytes"] / cap,
        "newest_missing_capacity_back": newest_missing,
        "puts": len(written),
        "gbps": total / secs / 1e9,
        "slab_bytes": st["slab_bytes"],
    }


def timing_split(
    endpoint: str, size: int, batch: int, seconds: float, run_id: str
) -> dict[str, dict[str, float]]:
    """Where the time of one PUT/GET frame goes, from the client's side (ms per frame):
    checksum, send, wait (request sent -> reply header: server work + network), recv, verify."""
    from membrain import _native
    from membrain.client.endpoints import parse_endpoint

    ep = parse_endpoint(endpoint)
    conn = _native.Connection(ep.host, ep.port, namespace="bench-split", timeout_ms=30000)
    data = np.random.default_rng(1).integers(0, 256, size * batch, dtype=np.uint8)
    vals = [data.data[i * size : (i + 1) * size] for i in range(batch)]
    dst = np.empty_like(data)
    dvals = [dst.data[i * size : (i + 1) * size] for i in range(batch)]
    out: dict[str, dict[str, float]] = {}
    warm = [f"{run_id}-split-warm-{j}".encode() for j in range(batch)]
    conn.put(warm, vals)
    it = [0]

    def fresh() -> None:
        it[0] += 1
        conn.put([f"{run_id}-split-{it[0]}-{j}".encode() for j in range(batch)], vals)

    for name, fn in (
        ("PUT", fresh),
        ("PUT*", lambda: conn.put(warm, vals)),
        ("GET", lambda: conn.get_into(warm, dvals)),
    ):
        conn.reset_timings()
        t0 = time.perf_counter()
        calls = 0
        while time.perf_counter() - t0 < seconds:
            fn()
            calls += 1
        wall = time.perf_counter() - t0
        t = conn.timings()
        frames = max(1, t.pop("frames"))
        row = {k: v / frames * 1e3 for k, v in t.items()}
        row["call_ms"] = wall / calls * 1e3
        row["gbps"] = calls * batch * size / wall / 1e9
        out[name] = row
    conn.close()
    return out


# ---------------------------------------------------------------------------- loopback limit


def loopback_limit(conns: int, seconds: float, write_bytes: int = MiB) -> dict[str, Any]:
    """One-way TCP throughput on loopback with `conns` parallel streams: iperf3 when installed,
    else a Python socket pair (sendall/recv_into of 1 MiB writes)."""
    if shutil.which("iperf3"):
        port = free_port()
        srv = subprocess.Popen(
            ["iperf3", "-s", "-1", "-p", str(port), "-B", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Not probed with a test connection: iperf3 -1 would count it as its one session.
        time.sleep(0.4)
        try:
            r = subprocess.run(
                [
                    "iperf3",
                    "-c",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-t",
                    str(max(1, round(seconds))),
                    "-l",
                    str(write_bytes),
                    "-P",
                    str(conns),
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            data = json.loads(r.stdout)
            bps = data["end"]["sum_received"]["bits_per_second"]
            return {"tool": "iperf3", "conns": conns, "gbps": bps / 8 / 1e9}
        except (subprocess.SubprocessError, ValueError, KeyError):
            pass
        finally:
            if srv.poll() is None:
                srv.kill()
            srv.wait()
    return _python_loopback(conns, seconds, write_bytes)


def _python_loopback(conns: int, seconds: float, write_bytes: int) -> dict[str, Any]:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(conns)
    port = lsock.getsockname()[1]
    total = [0] * conns
    stop = threading.Event()

    def receiver(i: int) -> None:
        s, _ = lsock.accept()
        buf = bytearray(write_bytes)
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            total[i] += n
        s.close()

    def sender() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        data = bytes(write_bytes)
        while not stop.is_set():
            s.sendall(data)
        s.close()

    rs = [threading.Thread(target=receiver, args=(i,)) for i in range(conns)]
    ss = [threading.Thread(target=sender) for _ in range(conns)]
    for t in rs + ss:
        t.start()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in ss + rs:
        t.join()
    lsock.close()
    return {"tool": "python-socket", "conns": conns, "gbps": sum(total) / (time.perf_counter() - t0) / 1e9}


# ---------------------------------------------------------------------------- Redis


class Redis:
    """A throwaway redis-server (no persistence) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="membrain-bench-redis-")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                self.dir,
                "--maxmemory",
                "3gb",
                "--maxmemory-policy",
                "allkeys-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def bench(self, size: int, conns: int, seconds: float) -> dict[str, float]:
        """SET on fresh random keys (-r) and GET spread over the working set Membrain's GET reads
        (16 distinct values per connection, loaded first), `size`-byte values, `conns` clients,
        no pipelining. Returns GB/s per test."""
        out: dict[str, float] = {}
        # Size n so each test lasts roughly `seconds` at ~2 GB/s, within sane bounds.
        n = int(min(200000, max(200, seconds * 2e9 / size)))
        # GET without -r would read the one literal key "key:__rand_int__" again and again: a
        # value that stays in cache, unlike the 16 x conns distinct values Membrain's GET reads.
        # So the same number of distinct values is loaded (after the SET run and a flush, so
        # LRU eviction cannot remove them) and GET picks among them with -r.
        keyspace = 16 * conns
        for test, extra in (("set", ["-r", "100000"]), ("get", ["-r", str(keyspace)])):
            if test == "get":
                subprocess.run(["redis-cli", "-p", str(self.port), "flushall"], capture_output=True)
                self._load(keyspace, size)
            cmd = [
                "redis-benchmark",
                "-p",
                str(self.port),
                "-t",
                test,
                "-d",
                str(size),
                "-c",
                str(conns),
                "-n",
                str(n),
                "-P",
                "1",
                "--csv",
                *extra,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, seconds * 20))
            for line in r.stdout.splitlines():
                cells = [c.strip('"') for c in line.split(",")]
                if len(cells) >= 2 and cells[0].upper() == test.upper():
                    out[test.upper()] = float(cells[1]) * size / 1e9
        subprocess.run(["redis-cli", "-p", str(self.port), "flushall"], capture_output=True)
        return out

    def _load(self, count: int, size: int) -> None:
        """SETs key:000000000000 .. key:{count-1} (redis-benchmark's -r key format) to distinct
        random `size`-byte values and checks they are all there."""
        with socket.create_connection(("127.0.0.1", self.port), 10) as s:
            for i in range(count):
                key = f"key:{i:012d}".encode()
                s.sendall(
                    b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, size)
                    + os.urandom(size)
                    + b"\r\n"
                )
            want, got = b"+OK\r\n" * count, b""
            while len(got) < len(want):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        if got != want:
            raise RuntimeError(f"loading the Redis GET working set failed: {got[:80]!r}")
        dbsize = subprocess.run(
            ["redis-cli", "-p", str(self.port), "dbsize"], capture_output=True, text=True
        ).stdout
        if dbsize.strip() != str(count):
            raise RuntimeError(f"Redis holds {dbsize.strip()!r} keys after loading {count}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------- driver


@dataclass
class Plan:
    points: list[tuple[int, int, int]] = field(default_factory=list)  # (size, batch, conns)
    seconds: float = 1.0


def make_plan(quick: bool, full: bool) -> Plan:
    if quick:
        pts = [(s, b, 1) for s in (64 * KiB, MiB) for b in (1, 16)] + [(MiB, 16, 4), (64 * KiB, 16, 4)]
        return Plan(pts, 0.6)
    sizes = [16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB]
    batches = [1, 4, 16, 64]
    conns = [1, 2, 4, 8]
    if full:
        pts = [(s, b, c) for s in sizes for b in batches for c in conns]
    else:
        pts = [(s, b, 1) for s in sizes for b in batches]
        pts += [(s, 16, c) for s in (64 * KiB, MiB) for c in conns if c != 1]
    # Keep the in-flight bytes of one point (sources + destinations) reasonable.
    pts = [(s, b, c) for s, b, c in pts if s * b * c <= 512 * MiB]
    return Plan(pts, 1.0)


def bench_ucx_vs_tcp(args: argparse.Namespace) -> int:
    """``--transport ucx``: one server listening on TCP and UCX; the same 1 MiB x16 workload over
    each, alternated per round (TCP, UCX, UCX, TCP) so drift on a shared machine hits both, with the
    UCX/TCP ratio per operation. UCX transports follow UCX_TLS / UCX_NET_DEVICES of this process
    (and of the server, which inherits them when spawned here)."""
    from membrain.server import spawn_server

    seconds = args.seconds or 2.0
    if args.endpoint:
        print("--transport ucx spawns its own server (it needs both listeners)", file=sys.stderr)
        return 2
    handle = spawn_server(
        capacity=int(args.capacity_gib * GiB),
        host="127.0.0.1",
        port=0,
        extra_args=["--threads", str(args.server_threads), "--ucx-port", "0"],
    )
    _wait_prefaulted(handle.port)
    run_id = f"u{os.getpid()}-{int(time.time())}"
    rows: list[dict[str, Any]] = []
    try:
        ucx_endpoint, ucx_port = handle.ucx_endpoint, handle.ucx_port
        if ucx_endpoint is None or ucx_port is None:  # cannot happen: spawned with --ucx-port 0
            raise RuntimeError(f"server {handle.endpoint} has no UCX listener")
        eps = {"tcp": handle.endpoint, "ucx": ucx_endpoint}
        print(
            f"server {eps['tcp']} + {eps['ucx']}  UCX_TLS={os.environ.get('UCX_TLS', '(default)')}",
            flush=True,
        )
        lanes = _ucx_lanes(ucx_port)
        print(lanes, flush=True)
        for rnd in range(max(1, args.accept_rounds or 3)):
            for c in (1, 4):
                res: dict[str, dict[str, float]] = {"tcp": {}, "ucx": {}}
                for tr in ("tcp", "ucx", "ucx", "tcp"):
                    for p in bench_membrain(
                        eps[tr], MiB, 16, c, seconds / 2, args.timeout_ms, f"{run_id}-{rnd}-{tr}"
                    ):
                        if p.failures:
                            print(f"  {tr} {p.op}: {p.failures} failed calls", flush=True)
                        res[tr].setdefault(p.op, 0.0)
                        res[tr][p.op] += p.gbps / 2
                row = {
                    "round": rnd,
                    "conns": c,
                    **{f"{tr}_{op}_gbps": v for tr in res for op, v in res[tr].items()},
                }
                rows.append(row)
                print(
                    f"round {rnd} c{c} 1 MiB x16: "
                    + "  ".join(
                        f"{op} tcp {res['tcp'][op]:.2f} / ucx {res['ucx'][op]:.2f} GB/s ({res['ucx'][op] / res['tcp'][op]:.2f}x)"
                        for op in res["tcp"]
                    ),
                    flush=True,
                )
    finally:
        _stop_server(handle)
    info = machine_info()
    _write_results(
        args,
        info,
        {
            "machine": info,
            "ucx_vs_tcp": rows,
            "ucx_tls": os.environ.get("UCX_TLS"),
            "ucx_err_mode": os.environ.get("MEMBRAIN_UCX_ERR_MODE", "peer"),
            "ucx_lanes": lanes,
        },
    )
    return 0


def _write_results(args: argparse.Namespace, info: dict[str, Any], result: dict[str, Any]) -> None:
    """To benchmarks/results/transfer_<transport>_<machine>.json, and to --json when given."""
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    default_path = out_dir / f"transfer_{args.transport}_{machine_tag(info)}.json"
    text = json.dumps(result, indent=2)
    default_path.write_text(text)
    print(f"results: {default_path}")
    if args.json:
        Path(args.json).write_text(text)


def _ucx_lanes(port: int) -> str:
    """The lanes UCX picked for a client endpoint to this server (which transports are measured)."""
    from membrain import _native

    conn = _native.UcxConnection("127.0.0.1", port)
    try:
        return "\n".join(line for line in conn.transport_info.splitlines() if "lane[" in line)
    finally:
        conn.close()


def _spawn_server(capacity: int, threads: int, eviction_policy: str | None = None) -> tuple[str, Any]:
    from membrain.server import spawn_server  # provided by the server package

    extra = ["--threads", str(threads)]
    if eviction_policy:
        extra += ["--eviction-policy", eviction_policy]
    handle = spawn_server(capacity=capacity, host="127.0.0.1", port=0, extra_args=extra)
    _wait_prefaulted(handle.port)
    return handle.endpoint, handle


def _wait_prefaulted(port: int, timeout_s: float = 120.0) -> None:
    """A server backs its storage with memory in the background after start; measuring before
    that finishes would time the kernel's page faults, not the server."""
    import json

    from membrain import _native

    conn = _native.Connection("127.0.0.1", port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = json.loads(conn.stats_json())
        if st.get("prefaulted_bytes", 0) >= st["capacity_bytes"]:
            break
        time.sleep(0.2)
    conn.close()


def _stop_server(handle: Any) -> None:
    for name in ("stop", "close", "terminate", "kill"):
        fn = getattr(handle, name, None)
        if callable(fn):
            fn()
            return


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="membrain bench transfer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", help="benchmark this running server instead of spawning one")
    ap.add_argument("--transport", choices=["tcp", "ucx"], default="tcp")
    ap.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    ap.add_argument("--full", action="store_true", help="every size x batch x connections combination")
    ap.add_argument("--seconds", type=float, help="duration of each measurement")
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument("--capacity-gib", type=float, default=4.0)
    ap.add_argument(
        "--eviction-policy",
        choices=["slru", "lru"],
        default=None,
        help="the spawned server's eviction policy (default: the server's default, slru)",
    )
    ap.add_argument("--timeout-ms", type=int, default=10000)
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument(
        "--accept-rounds",
        type=int,
        default=None,
        help="paired acceptance measurements (1 MiB x16, 1 and 4 connections); default 5, 1 with --quick",
    )
    ap.add_argument("--no-loopback", action="store_true")
    ap.add_argument(
        "--redis-cluster",
        action="store_true",
        help="backends side by side instead: Membrain, the Redis Cluster backend on a local "
        "3-master cluster, redis-py pipelined (1 MiB x16)",
    )
    ap.add_argument(
        "--backend",
        metavar="redis-cluster://H:P,...",
        help="like --redis-cluster, on this running cluster",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --redis-cluster / --backend")
    ap.add_argument("--json", metavar="PATH", help="also write results here")
    ap.add_argument(
        "--results-dir", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "results")
    )
    args = ap.parse_args(argv)

    if args.redis_cluster or args.backend:
        from membrain.bench.backends import bench_backends

        res = bench_backends(
            args.backend,
            rounds=args.rounds,
            seconds=args.seconds or 2.0,
            membrain_capacity=int(min(args.capacity_gib, 1.0) * GiB),
            server_threads=args.server_threads,
        )
        info = machine_info()
        out = Path(args.results_dir) / f"transfer_backends_{machine_tag(info)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"machine": info, "backends": res}, indent=2)
        out.write_text(text)
        print(f"results: {out}")
        if args.json:
            Path(args.json).write_text(text)
        return 0

    if args.transport == "ucx":
        from membrain import _native

        if not _native.native_info().get("ucx"):
            print(
                "membrain bench transfer: the UCX transport is not built in this installation",
                file=sys.stderr,
            )
            return 2
        return bench_ucx_vs_tcp(args)

    plan = make_plan(args.quick, args.full)
    if args.accept_rounds is None:
        args.accept_rounds = 1 if args.quick else 5
    if args.seconds:
        plan.seconds = args.seconds
    info = machine_info()
    handle = None
    endpoint = args.endpoint
    if not endpoint:
        endpoint, handle = _spawn_server(
            int(args.capacity_gib * GiB), args.server_threads, args.eviction_policy
        )
    run_id = f"r{os.getpid()}-{int(time.time())}"
    points: list[Point] = []
    lookup: dict[str, Any] = {}
    mixed: dict[str, Any] = {}
    split: dict[str, dict[str, float]] = {}
    accept_rows: list[dict[str, Any]] = []
    try:
        # LOOKUP_PREFIX first, while the server is idle.
        lookup = bench_lookup(endpoint, 300 if args.quick else 2000, args.timeout_ms, 1 if args.quick else 5)
        print(
            f"LOOKUP_PREFIX 64 keys, median of {len(lookup['rounds'])} rounds: p50 {lookup['p50_ms']:.3f} ms  "
            f"p99 {lookup['p99_ms']:.3f} ms (per round: "
            + ", ".join(f"{r['p99_ms']:.3f}" for r in lookup["rounds"])
            + f"; raw connection p50 {lookup['native_p50_ms']:.3f} / p99 {lookup['native_p99_ms']:.3f} ms)",
            flush=True,
        )
        mixed = bench_mixed_fill()
        print(
            f"MIXED 1B/4KiB/64KiB/1MiB/3MB into {mixed['capacity_bytes'] >> 20} MiB: first eviction at "
            f"{mixed['live_fraction_at_first_eviction']:.1%} of capacity live (target >= 90%), "
            f"{mixed['live_fraction_at_end']:.1%} live after 2x capacity, newest missing value "
            f"{mixed['newest_missing_capacity_back'] or 0:.2f} capacities back, {mixed['gbps']:.2f} GB/s",
            flush=True,
        )
        split = timing_split(endpoint, MiB, 16, plan.seconds, run_id)
        print(
            "time per 16 x 1 MiB frame, client view (ms): "
            + "; ".join(
                f"{op}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "gbps")
                for op, row in split.items()
            ),
            flush=True,
        )
        # Acceptance block: on a shared machine the load drifts, so each Membrain figure is
        # paired with loopback and Redis figures taken right next to it (loopback, Membrain,
        # Redis, loopback), and the paired ratios are reported per round.
        have_redis = not args.no_redis and bool(
            shutil.which("redis-server") and shutil.which("redis-benchmark")
        )
        for rnd in range(args.accept_rounds):
            for c in (1, 4):
                lb0 = loopback_limit(c, 1.0) if not args.no_loopback else None
                pts = bench_membrain(
                    endpoint, MiB, 16, c, plan.seconds, args.timeout_ms, f"{run_id}-acc{rnd}"
                )
                rv: dict[str, float] = {}
                if have_redis:
                    r = Redis()
                    try:
                        rv = r.bench(MiB, c, 1.0)
                    finally:
                        r.close()
                lb1 = loopback_limit(c, 1.0) if not args.no_loopback else None
                lb = (lb0["gbps"] + lb1["gbps"]) / 2 if lb0 and lb1 else None
                row: dict[str, Any] = {"round": rnd, "conns": c, "loopback_gbps": lb, "redis_gbps": rv}
                for p in pts:
                    red = rv.get("GET" if p.op == "GET" else "SET")
                    row[p.op] = {
                        "gbps": p.gbps,
                        "p50_ms": p.p50_ms,
                        "p99_ms": p.p99_ms,
                        "vs_loopback": p.gbps / lb if lb else None,
                        "vs_redis": p.gbps / red if red else None,
                    }
                accept_rows.append(row)
                print(
                    f"acceptance round {rnd} c{c}: loopback {lb or float('nan'):.2f} GB/s, redis "
                    + " ".join(f"{k} {v:.2f}" for k, v in rv.items())
                    + " | "
                    + "  ".join(
                        f"{p.op} {p.gbps:.2f} GB/s ({row[p.op]['vs_loopback'] or float('nan'):.2f}x loop, "
                        f"{row[p.op]['vs_redis'] or float('nan'):.2f}x redis)"
                        for p in pts
                    ),
                    flush=True,
                )
        for size, batch, conns in plan.points:
            pts = bench_membrain(endpoint, size, batch, conns, plan.seconds, args.timeout_ms, run_id)
            for p in pts:
                print(
                    f"  {p.op:<4} {fmt_size(size):>7} x{batch:<3} c{conns}: {p.gbps:6.2f} GB/s "
                    f"{p.ops_s:9.0f} val/s  p50 {p.p50_ms:8.3f} ms  p99 {p.p99_ms:8.3f} ms"
                    + (f"  FAILED {p.failures}" if p.failures else ""),
                    flush=True,
                )
            points += pts
    finally:
        if handle is not None:
            _stop_server(handle)

    conns_used = sorted({c for _, _, c in plan.points})
    loop: dict[int, dict[str, Any]] = {}
    if not args.no_loopback:
        for c in conns_used:
            loop[c] = loopback_limit(c, 2.0 if not args.quick else 1.0)
            print(
                f"loopback TCP limit, {c} stream(s): {loop[c]['gbps']:.2f} GB/s ({loop[c]['tool']})",
                flush=True,
            )
    redis: dict[str, dict[str, float]] = {}
    if not args.no_redis and shutil.which("redis-server") and shutil.which("redis-benchmark"):
        r = Redis()
        try:
            combos = sorted(
                {(s, c) for s, _, c in plan.points if s <= 4 * MiB and (args.full or s in (64 * KiB, MiB))}
            )
            for s, c in combos:
                redis[f"{s}/{c}"] = r.bench(s, c, 1.0 if args.quick else 2.0)
                print(
                    f"redis-benchmark {fmt_size(s)} c{c}: "
                    + "  ".join(f"{k} {v:.2f} GB/s" for k, v in redis[f"{s}/{c}"].items()),
                    flush=True,
                )
        finally:
            r.close()

    for p in points:
        if p.conns in loop and loop[p.conns]["gbps"] > 0:
            p.vs_loopback = p.gbps / loop[p.conns]["gbps"]
        redis_gbps = redis.get(f"{p.size}/{p.conns}", {}).get("GET" if p.op == "GET" else "SET")
        if redis_gbps:
            p.vs_redis = p.gbps / redis_gbps

    print()
    print(
        f"{'op':<5}{'size':>8}{'batch':>6}{'conns':>6}{'GB/s':>8}{'values/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'x loop':>8}{'x redis':>8}"
    )
    for p in points:
        vl = f"{p.vs_loopback:.2f}" if p.vs_loopback is not None else "-"
        vr = f"{p.vs_redis:.2f}" if p.vs_redis is not None else "-"
        print(
            f"{p.op:<5}{fmt_size(p.size):>8}{p.batch:>6}{p.conns:>6}{p.gbps:>8.2f}{p.ops_s:>11.0f}"
            f"{p.p50_ms:>9.3f}{p.p99_ms:>9.3f}{vl:>8}{vr:>8}"
        )
    print(
        f"LOOKUP_PREFIX 64 keys: p50 {lookup.get('p50_ms', float('nan')):.3f} ms, "
        f"p99 {lookup.get('p99_ms', float('nan')):.3f} ms (median over rounds; worst round "
        f"{lookup.get('p99_ms_max', float('nan')):.3f} ms)"
    )

    accept = [p for p in points if p.size == MiB and p.batch == 16]
    paired = paired_summary(accept_rows)
    judged = [v for k, v in paired.items() if not k.startswith("PUT*")]
    verdict = {
        "points": [asdict(p) for p in accept],
        "note": "PUT = fresh keys (server faults in new memory); PUT* = rewriting warm keys. Verdicts use the "
        "median over the paired rounds of each ratio (loopback and Redis measured beside each point), "
        "judged on PUT and GET at 1 and 4 connections; min/max are in paired_summary.",
        "paired_summary": paired,
        "put_get_ge_0.7x_loopback": all(v["vs_loopback"]["median"] >= 0.7 for v in judged)
        if judged
        else None,
        # None (not judged) unless every judged cell has a Redis figure beside it.
        "put_get_ge_1.3x_redis": (
            all(v["vs_redis"]["median"] >= 1.3 for v in judged)
            if judged and all(v["vs_redis"] for v in judged)
            else None
        ),
        "lookup_p99_lt_1ms": lookup.get("p99_ms", 1e9) < 1.0,
    }
    print("acceptance (1 MiB x16):", json.dumps({k: v for k, v in verdict.items() if k != "points"}))
    for p in accept:
        vl = f"{p.vs_loopback:.2f}x loopback" if p.vs_loopback is not None else "no loopback figure"
        vr = f"{p.vs_redis:.2f}x redis" if p.vs_redis is not None else "no redis figure"
        print(f"  {p.op:<4} c{p.conns}: {p.gbps:.2f} GB/s = {vl} (need 0.7), {vr} (need 1.3)")
    for key, v in paired.items():
        red = v["vs_redis"]
        print(
            f"  paired {key}: x{v['vs_loopback']['median']:.2f} loopback (min {v['vs_loopback']['min']:.2f}, "
            f"max {v['vs_loopback']['max']:.2f})"
            + (f", x{red['median']:.2f} redis (min {red['min']:.2f}, max {red['max']:.2f})" if red else "")
            + f" over {v['rounds']} rounds"
        )
    if accept_rows:
        print("paired acceptance (1 MiB x16; ratios to loopback / Redis measured beside each point):")
        for row in accept_rows:
            cells = []
            for op in ("PUT", "PUT*", "GET"):
                cell = row.get(op)
                if cell:
                    vl = f"{cell['vs_loopback']:.2f}" if cell["vs_loopback"] else "-"
                    vr = f"{cell['vs_redis']:.2f}" if cell["vs_redis"] else "-"
                    cells.append(f"{op} {cell['gbps']:.2f} GB/s x{vl} loop x{vr} redis")
            print(f"  round {row['round']} c{row['conns']}: " + " | ".join(cells))
    result = {
        "machine": info,
        "endpoint": endpoint if args.endpoint else "spawned",
        "transport": args.transport,
        "seconds_per_point": plan.seconds,
        "points": [asdict(p) for p in points],
        "lookup_prefix": lookup,
        "mixed_fill": mixed,
        "timing_split_1MiB_x16": split,
        "loopback": {str(k): v for k, v in loop.items()},
        "redis": redis,
        "acceptance": verdict,
        "acceptance_paired": accept_rows,
        "argv": list(argv or []),
    }
    _write_results(args, info, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
