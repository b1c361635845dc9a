"""End-to-end TTFT benchmark: cold, fresh-instance-warm (from Membrain) and local-warm (vLLM's own
prefix cache) for several prompt lengths, on the current vLLM build.

Instance A (Membrain on): each prompt cold, then again (local prefix-cache hit). Instance B, a
fresh process with the same Membrain settings: each prompt once (served from the remote tier,
its host tier being empty). TTFT = wall time of a ``max_tokens=1`` request. For B each row also
carries the worker's load (from its ``MEMBRAIN LOAD`` line): total seconds, queued, host-tier
scatter, waiting on remote fetches, remote scatter, and the effective GB/s (bytes / seconds),
also as a ratio to the transport's GET rate at the same value size (one KV block), measured on
the same server right before and right after B (:func:`get_reference`; this host's memory
bandwidth drifts within minutes, so the ratio uses the mean of the two, both are reported).

Shapes (random-weight Llama, bf16): ``small`` hidden 512, 6 layers, 4 KV heads of 64 (6 KiB of
KV per token); ``wide`` hidden 512, 16 layers, 8 KV heads of 128 (64 KiB per token), where moving
KV is a larger share of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from membrain.bench import common as C
from membrain.bench.machine import machine_info
from membrain.tiers.executor import fetch_chunk_blocks

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
SHAPES: dict[str, dict[str, int]] = {
    "small": {"hidden": 512, "layers": 6, "kv_heads": 4, "head_dim": 64},
    "wide": {"hidden": 512, "layers": 16, "kv_heads": 8, "head_dim": 128},
}


def shape_model(shape_name: str, model_dir: str | None = None) -> str:
    """The random-weight model of ``shape_name`` (generated once, by default under
    ``~/.cache/membrain/bench-model[-SHAPE]``); returns its directory."""
    shape = SHAPES[shape_name]
    suffix = "" if shape_name == "small" else f"-{shape_name}"
    return C.ensure_model(
        model_dir or os.path.expanduser(f"~/.cache/membrain/bench-model{suffix}"),
        shape["hidden"],
        shape["layers"],
        kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
    )


def kv_bytes_per_token(shape: dict[str, int]) -> int:
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2  # K and V, bf16


def get_reference(endpoint: str, value_bytes: int, batch: int, rounds: int = 5) -> dict[str, Any]:
    """``Client.get_into`` of ``batch`` values of ``value_bytes`` (one KV block) from the server
    the instances used, in one call, as a load's fetch chunk is: the transport's GET rate at the
    load's value size, measured in the same run (median of ``rounds``)."""
    import numpy as np

    from membrain import Client
    from membrain.bench.timing import gbps, median_seconds

    client = Client(endpoint, namespace=f"bench-get-{int(time.time())}", timeout_ms=60_000)
    try:
        keys = [f"get-ref-{i}".encode() for i in range(batch)]
        values = [
            np.random.default_rng(i).integers(0, 256, value_bytes, dtype=np.uint8) for i in range(batch)
        ]
        if not all(client.put(keys, values)):
            raise SystemExit(f"the GET reference could not store {batch} x {value_bytes} B on {endpoint}")
        bufs = [np.empty(value_bytes, dtype=np.uint8) for _ in range(batch)]

        def get() -> None:
            if not all(client.get_into(keys, bufs)):
                raise SystemExit("the GET reference missed its own values")

        seconds = median_seconds(get, repeats=rounds, warmup=1)
        client.delete(keys)
    finally:
        client.close()
    return {
        "value_bytes": value_bytes,
        "batch": batch,
        "seconds": seconds,
        "gb_per_s": gbps(value_bytes * batch, seconds),
    }


def run(
    lengths: list[int],
    model_dir: str,
    workdir: Path,
    endpoint: str | None,
    hidden: int = 512,
    layers: int = 6,
    kv_bytes: int = 1 << 30,
    kv_heads: int = 4,
    head_dim: int = 64,
    transport: str = "tcp",
) -> dict[str, Any]:
    model = C.ensure_model(model_dir, hidden, layers, kv_heads=kv_heads, head_dim=head_dim)
    per_token = kv_bytes_per_token({"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim})
    # Room for every prompt at once, so the local-warm pass is a real prefix-cache hit.
    kv_bytes = max(kv_bytes, int(1.5 * per_token * (sum(lengths) + 64 * len(lengths))))
    server = None
    if endpoint is None:
        server = C.start_server("4GiB", workdir / "server.log", ucx=transport == "ucx")
        if server is None:
            raise SystemExit(f"the local Membrain server did not start; see {workdir / 'server.log'}")
        endpoint = server.ucx_endpoint if transport == "ucx" else server.endpoint
        if endpoint is None:
            raise SystemExit("the server has no UCX listener: this build lacks UCX (native_info()['ucx'])")
    try:
        prompts = [C.make_prompts(1, n, seed=100 + n)[0] for n in lengths]
        extra = {"endpoint": endpoint, "namespace": f"bench-{int(time.time())}", "cpu_cache_size": "2GiB"}
        base = {
            "model": model,
            "prompts": prompts,
            "max_tokens": 1,
            "membrain": "explicit",
            "extra": extra,
            "kv_cache_memory_bytes": kv_bytes,
            "max_model_len": max(lengths) + 64,
            "max_num_batched_tokens": max(lengths) + 64,
        }
        a = C.run_instance({**base, "repeat": 2}, C.base_env(), workdir, "bench_A", timeout=3600)
        if a["rc"]:
            raise SystemExit(f"vLLM run failed: see {a['log_path']}")
        block_bytes = per_token * int(a["engine"].get("block_size", 16))
        before = get_reference(endpoint, block_bytes, fetch_chunk_blocks(block_bytes))
        b = C.run_instance({**base, "repeat": 1}, C.base_env(), workdir, "bench_B", timeout=3600)
        if b["rc"]:
            raise SystemExit(f"vLLM run failed: see {b['log_path']}")
        after = get_reference(endpoint, block_bytes, fetch_chunk_blocks(block_bytes))
        get_ref = {
            "value_bytes": block_bytes,
            "batch": after["batch"],
            "gb_per_s": (before["gb_per_s"] + after["gb_per_s"]) / 2,
            "before_b_gb_per_s": before["gb_per_s"],
            "after_b_gb_per_s": after["gb_per_s"],
        }
    finally:
        if server is not None:
            server.stop()
    n = len(prompts)
    loads = C.parse_loads(b["log"])
    rows = []
    for i, L in enumerate(lengths):
        cold, local, fresh = (
            a["results"][i]["seconds"],
            a["results"][n + i]["seconds"],
            b["results"][i]["seconds"],
        )
        rows.append(
            {
                "prompt_tokens": L,
                "cold_s": cold,
                "local_warm_s": local,
                "fresh_warm_s": fresh,
                "speedup_fresh_vs_cold": cold / fresh,
                "fresh_vs_local": fresh / local,
                # vLLM's own prefix-cache path is the reference (the same cached length); a cold
                # prefill may round differently on some CPUs (AMX), so that match is informative.
                "tokens_match": a["results"][n + i]["tokens"] == b["results"][i]["tokens"],
                "tokens_match_cold": a["results"][i]["tokens"] == b["results"][i]["tokens"],
            }
        )
        if i < len(loads):  # B's loads, one per prompt, in order
            ld = loads[i]
            gb_per_s = ld["bytes"] / ld["seconds"] / 1e9 if ld["seconds"] > 0 else 0.0
            rows[-1]["load"] = {
                k: ld[k] for k in ("req", "remote", "host", "failed", "bytes", "seconds", "queued")
            } | {
                "host_scatter_s": ld["host_s"],
                "fetch_wait_s": ld["fetch_wait"],
                "scatter_s": ld["scatter"],
                "page_faults_fetch": ld["faults_fetch"],
                "page_faults_scatter": ld["faults_scatter"],
                "gb_per_s": gb_per_s,
                "vs_get": gb_per_s / get_ref["gb_per_s"],
            }
    return {
        "rows": rows,
        "endpoint_scheme": endpoint.split("://", 1)[0],
        "get_reference": get_ref,
        "hits_B": C.hit_totals(b["log"]),
        "model": {
            "hidden": hidden,
            "layers": layers,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "kv_bytes_per_token": per_token,
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["prompt_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("cold_s", "cold"),
        ("fresh_warm_s", "fresh instance, from Membrain"),
        ("local_warm_s", "same instance, vLLM prefix cache"),
    ):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="model shape (see above)")
    p.add_argument("--model-dir", default=None, help="default: ~/.cache/membrain/bench-model[-SHAPE]")
    p.add_argument("--endpoint", default=None, help="a running Membrain server (default: start one)")
    p.add_argument(
        "--transport",
        choices=("tcp", "ucx"),
        default="tcp",
        help="how the instances and the GET reference reach the server started here: tcp "
        "(default) or ucx (on one host UCX moves values through shared memory)",
    )
    p.add_argument("--out", default="e2e_ttft")
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    wd = Path(a.workdir or C.tmpdir("membrain-bench-"))
    wd.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[a.shape]
    model_dir = shape_model(a.shape, a.model_dir)
    res = run(
        [int(x) for x in a.lengths.split(",")], model_dir, wd, a.endpoint, **shape, transport=a.transport
    )
    res["shape"] = a.shape
    res["machine"] = machine_info()
    Path(a.out + ".json").write_text(json.dumps(res, indent=2))
    plot(res, Path(a.out + ".png"))
    print(f"shape {a.shape}: {res['model']}")
    for r in res["rows"]:
        print(
            f"{r['prompt_tokens']:>6} tok  cold {r['cold_s']:7.2f}s  fresh-warm {r['fresh_warm_s']:6.2f}s  "
            f"local-warm {r['local_warm_s']:6.2f}s  speedup {r['speedup_fresh_vs_cold']:5.1f}x  "
            f"tokens vs local hit {'=' if r['tokens_match'] else 'DIFFER'}"
        )
        ld = r.get("load")
        if ld:
            print(
                f"         load {ld['seconds'] * 1e3:8.1f} ms = queued {ld['queued'] * 1e3:.1f} + host "
                f"{ld['host_scatter_s'] * 1e3:.1f} + fetch wait {ld['fetch_wait_s'] * 1e3:.1f} + scatter "
                f"{ld['scatter_s'] * 1e3:.1f} ms; {ld['bytes'] / 2**20:.1f} MiB at {ld['gb_per_s']:.2f} GB/s "
                f"= {ld['vs_get']:.2f}x GET; page faults: fetch {ld['page_faults_fetch']}, "
                f"scatter {ld['page_faults_scatter']}"
            )
    ref = res["get_reference"]
    print(
        f"GET reference, same server and run: {ref['batch']} x {ref['value_bytes'] / 2**20:.1f} MiB per call "
        f"at {ref['gb_per_s']:.2f} GB/s (mean of {ref['before_b_gb_per_s']:.2f} before and "
        f"{ref['after_b_gb_per_s']:.2f} after the fresh instance)"
    )
    print(f"wrote {a.out}.json and {a.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
