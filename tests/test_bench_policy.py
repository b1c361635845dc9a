"""`membrain bench policy` on a small generated trace: JSON rows, PNG, and sanity of the figures."""

from __future__ import annotations

import json
import random

from membrain.bench import policy as bench


def _trace(path, n=300, seed=3):
    # Conversations that extend their own prefix, interleaved with one-off documents.
    rng = random.Random(seed)
    nxt = 0
    convs: list[list[int]] = []
    with open(path, "w") as f:
        for t in range(n):
            if convs and rng.random() < 0.6:
                c = rng.choice(convs)
                c.extend(range(nxt, nxt + 1))
                nxt += 1
                ids = list(c)
            else:
                k = rng.randrange(2, 30)
                ids = list(range(nxt, nxt + k))
                nxt += k
                if rng.random() < 0.5:
                    convs.append(list(ids))
            f.write(
                json.dumps({"timestamp": t, "input_length": 512 * len(ids) - 100, "hash_ids": ids}) + "\n"
            )


def test_bench_policy_json_shape_and_png(tmp_path):
    trace, out, png = tmp_path / "t.jsonl", tmp_path / "p.json", tmp_path / "p.png"
    _trace(trace)
    rc = bench.main(
        ["--trace", str(trace), "--capacity-fraction", "0.05,0.2", "--json", str(out), "--png", str(png)]
    )
    assert rc == 0 and png.stat().st_size > 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "policy" and doc["default_policy"] == "slru"
    assert doc["machine"]["cpu_model"]
    rows = doc["rows"]
    for r in rows:
        assert {
            "policy",
            "capacity_fraction",
            "capacity_blocks",
            "prefix_hit_ratio",
            "byte_hit_ratio",
        } <= set(r)
        assert 0.0 <= r["prefix_hit_ratio"] <= 1.0
    names = {r["policy"] for r in rows}
    assert {"lru", "slru", "lru+seen", "slru+seen", "optimum", "unlimited"} <= names
    unlimited = next(r for r in rows if r["policy"] == "unlimited")["prefix_hit_ratio"]
    for frac in (0.05, 0.2):
        at = {r["policy"]: r for r in rows if r["capacity_fraction"] == frac}
        assert at["lru"]["capacity_blocks"] == int(frac * doc["distinct_blocks"])
        best = at["optimum"]["prefix_hit_ratio"]
        assert all(r["prefix_hit_ratio"] <= best + 1e-9 for r in at.values())
        assert best <= unlimited + 1e-9


def test_bench_policy_replays_the_real_policy(tmp_path):
    # The replay is the C++ PolicyIndex: an unlimited capacity hits every block seen before.
    trace = tmp_path / "t.jsonl"
    _trace(trace, n=80)
    reqs = bench.load_trace(trace)
    distinct = len({h for r in reqs for h in r["hash_ids"]})
    hits = bench.replay(reqs, "slru", distinct)
    seen: set[int] = set()
    for r, h in zip(reqs, hits):
        n = 0
        for x in r["hash_ids"]:
            if x not in seen:
                break
            n += 1
        assert h == n
        seen.update(r["hash_ids"])
    assert bench.optimum(reqs, distinct) == hits
