"""Remote-tier backends side by side (``membrain bench transfer --redis-cluster`` or
``--backend redis-cluster://...``): Membrain's own server, the Redis Cluster backend
(:class:`~membrain.tiers.redis_backend.RedisBackend`: one pipelined round trip per master, the
masters in parallel, XXH3 trailer verified) and plain redis-py pipelined SET / GET on one
standalone redis-server, at 1 MiB x 16 per batch from one caller thread, in interleaved rounds
(every other round in reverse order). redis-py's own cluster pipeline on the same cluster is
measured too, as a reference: what an operator would otherwise use there.

Acceptance: the cluster backend moves at least 1.3x what redis-py pipelined moves on one
standalone server in the same run (the harder baseline: one server process, no cluster hops).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MiB = 1 << 20


def _rate(step: Callable[[], int], seconds: float) -> float:
    """GB/s of ``step`` (returns bytes moved; 0 means a failure, which is not counted)."""
    step()
    t0 = time.monotonic()
    moved = 0
    while time.monotonic() - t0 < seconds:
        moved += step()
    return moved / (time.monotonic() - t0) / 1e9


def _data(batch: int, size: int) -> tuple[list[bytes], list[memoryview], list[memoryview]]:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size * batch, dtype=np.uint8)
    dst = np.zeros(size * batch, dtype=np.uint8)
    keys = [os.urandom(16) for _ in range(batch)]
    vals = [src.data[i * size : (i + 1) * size] for i in range(batch)]
    bufs = [dst.data[i * size : (i + 1) * size] for i in range(batch)]
    return keys, vals, bufs


def _backend_steps(client: Any, batch: int, size: int) -> tuple[Callable[[], int], Callable[[], int]]:
    """PUT and GET steps over a client with put(...) / get_into(...) (Membrain Client, RedisBackend)."""
    keys, vals, bufs = _data(batch, size)

    def put() -> int:
        return size * int(sum(client.put(keys, vals)))

    def get() -> int:
        return size * int(sum(client.get_into(keys, bufs)))

    if sum(client.put(keys, vals)) != batch:
        raise RuntimeError("backend refused the working set")
    if not all(client.get_into(keys, bufs)):
        raise RuntimeError("backend lost the working set")
    return put, get


def _redis_py_steps(
    port: int | None, batch: int, size: int, cluster: str | None = None
) -> tuple[Callable[[], int], Callable[[], int]]:
    """Plain redis-py: one pipeline of SETs / GETs (the values as they are: no checksum, GET
    results stay as bytes objects), on one connection to a standalone server (``port``) or, as
    redis-py's RedisCluster pipeline, on the cluster at ``cluster`` (redis-cluster://...)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    r: Any
    if cluster is not None:
        from membrain.tiers.redis_backend import parse_redis_endpoints
        from membrain.vllm.config import parse_endpoints

        _, nodes = parse_redis_endpoints(parse_endpoints(cluster))
        r = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], socket_timeout=10)  # type: ignore[no-untyped-call]
    elif port is not None:
        r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
    else:
        raise ValueError("a standalone port or a cluster endpoint is needed")
    keys, vals, _ = _data(batch, size)

    def put() -> int:
        p = r.pipeline(transaction=False)
        for k, v in zip(keys, vals):
            p.set(k, v)
        return size * sum(1 for x in p.execute() if x is True)

    def get() -> int:
        p = r.pipeline(transaction=False)
        for k in keys:
            p.get(k)
        return sum(len(x) for x in p.execute() if isinstance(x, bytes))

    put()
    return put, get


def bench_backends(
    cluster_endpoint: str | None,
    rounds: int = 3,
    seconds: float = 2.0,
    batch: int = 16,
    size: int = MiB,
    membrain_capacity: int = 1 << 30,
    server_threads: int = 2,
) -> dict[str, Any]:
    """Starts what is not given (a local 3-master cluster, a standalone redis-server, a Membrain
    server), measures PUT and GET of each in interleaved rounds, stops what it started."""
    from membrain.bench.redis_local import RedisCluster, RedisNode
    from membrain.bench.transfer import _spawn_server, _stop_server
    from membrain.client import Client
    from membrain.tiers.redis_backend import RedisBackend
    from membrain.vllm.config import parse_endpoints

    started: list[Any] = []
    clients: list[Any] = []
    try:
        if cluster_endpoint is None:
            cl = RedisCluster(3)
            started.append(cl)
            cluster_endpoint = cl.endpoint
        standalone = RedisNode()
        started.append(standalone)
        mb_endpoint, handle = _spawn_server(membrain_capacity, server_threads)
        cluster = RedisBackend(parse_endpoints(cluster_endpoint), namespace="bench", timeout_ms=10000)
        mb = Client(mb_endpoint, namespace="bench", timeout_ms=10000)
        clients += [cluster, mb]
        steps = {
            "membrain": _backend_steps(mb, batch, size),
            "redis_cluster_backend": _backend_steps(cluster, batch, size),
            "redis_py_pipelined": _redis_py_steps(standalone.port, batch, size),
            # What an operator would otherwise use on the same cluster (reference only).
            "redis_py_cluster_pipelined": _redis_py_steps(None, batch, size, cluster=cluster_endpoint),
        }
        per_round: list[dict[str, dict[str, float]]] = []
        for rnd in range(rounds):
            row: dict[str, dict[str, float]] = {}
            # Every other round in reverse order, so no backend always runs first (or last) as
            # the host's speed drifts.
            order = list(steps) if rnd % 2 == 0 else list(reversed(steps))
            for name in order:
                put, get = steps[name]
                row[name] = {"PUT": _rate(put, seconds), "GET": _rate(get, seconds)}
            row = {name: row[name] for name in steps}
            for op in ("PUT", "GET"):
                row.setdefault("cluster_vs_redis_py", {})[op] = (
                    row["redis_cluster_backend"][op] / row["redis_py_pipelined"][op]
                )
                row.setdefault("cluster_vs_redis_py_cluster", {})[op] = (
                    row["redis_cluster_backend"][op] / row["redis_py_cluster_pipelined"][op]
                )
            per_round.append(row)
            print(
                f"round {rnd + 1}/{rounds} ({batch} x {size // MiB} MiB, one caller thread): "
                + "; ".join(
                    f"{name} PUT {v['PUT']:.2f} GET {v['GET']:.2f}"
                    + ("x" if name.startswith("cluster_vs_") else " GB/s")
                    for name, v in row.items()
                ),
                flush=True,
            )
        med = {
            name: {op: statistics.median(r[name][op] for r in per_round) for op in ("PUT", "GET")}
            for name in per_round[0]
        }
        accept = {op: med["cluster_vs_redis_py"][op] >= 1.3 for op in ("PUT", "GET")}
        print(
            "median: "
            + "; ".join(f"{n} PUT {v['PUT']:.2f} GET {v['GET']:.2f}" for n, v in med.items())
            + f"\nacceptance cluster backend >= 1.3x redis-py pipelined: PUT {accept['PUT']} GET {accept['GET']}",
            flush=True,
        )
        return {
            "batch": batch,
            "size": size,
            "cluster_endpoint": cluster_endpoint,
            "rounds": per_round,
            "median": med,
            "cluster_ge_1.3x_redis_py": accept,
        }
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:
                pass
        if "handle" in locals():
            _stop_server(handle)
        for s in started:
            s.close()
