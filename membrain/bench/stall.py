"""Decode-stall benchmark: does loading a long prefix stall the requests already decoding?

One request decodes (streamed through vLLM's async engine, a timestamp per token) while a new
request arrives whose long prefix is in Membrain. Reported per mode:

* the decoding stream's inter-token gaps: the median before the new request arrives, the largest
  while the request waits for its KV (the load), their excess over that median in all (the
  stream's decode time lost to the wait), and the step that computes the request's remaining
  tokens;
* the new request's TTFT;
* the same two figures for that prompt once more in the same instance: vLLM's own prefix-cache
  hit, the reference for the step that computes the remaining tokens.

Modes: ``membrain`` (a fresh instance B; instance A stored the prefix in a local Membrain server
first) and ``off`` (no connector: the prefix is prefilled cold, the baseline). Acceptance of
issue #12: in ``membrain`` mode every gap while the request waits for its KV <= 1.5x the median
before, and the step that computes its remaining tokens <= 1.5x that step after a local
prefix-cache hit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from membrain.bench import common as C
from membrain.bench.e2e import SHAPES, kv_bytes_per_token, shape_model
from membrain.bench.machine import machine_info


def gap_stats(phase: dict[str, Any]) -> dict[str, float]:
    """The decoding stream's gaps around the long request, in seconds: the median before it
    arrived; the step that computed its remaining tokens (the gap that ends with its first
    token); and the largest gap between its arrival and that step -- the wait for its KV (the
    load, or nothing to wait for after a local hit; a cold prefill spans several steps, the
    last one counted as the compute step)."""
    st = phase["decode_stamps"]
    arrive, first = phase["long_arrive"], phase["long_first_token"]
    gaps = [(st[i - 1], st[i]) for i in range(1, len(st))]
    before = [b - a for a, b in gaps if b <= arrive]
    after = [(a, b) for a, b in gaps if b > arrive]
    # The step that produced the long request's first token also produced a stream token.
    k = min(range(len(after)), key=lambda i: abs(after[i][1] - first)) if after else -1
    waiting = [b - a for a, b in after[:k]] if k > 0 else []
    # The stream must run past the first token, or the wait is not covered and the "compute
    # step" would be the stream's last gap (a stream too short for the load).
    covered = bool(st) and st[-1] > first
    med = statistics.median(before) if before else float("nan")
    worst = max(waiting) if waiting else 0.0
    # The decode time the wait cost the stream: how much longer its gaps were than the median.
    excess = sum(g - med for g in waiting) if waiting else 0.0
    compute = after[k][1] - after[k][0] if k >= 0 else float("nan")
    return {
        "median_gap_before_s": med,
        "max_gap_while_waiting_s": worst,
        "max_wait_gap_ratio": worst / med if med > 0 else float("nan"),
        "gaps_while_waiting": len(waiting),
        "excess_while_waiting_s": excess,
        "compute_step_s": compute,
        "ttft_s": first - arrive,
        "stream_covered_wait": covered,
    }


def run_mode(
    mode: str, model: str, prefix: list[int], decode_prompt: list[int], args: argparse.Namespace, wd: Path
) -> dict[str, Any]:
    per_token = kv_bytes_per_token(SHAPES[args.shape])
    kv_bytes = max(1 << 30, int(2.5 * per_token * (len(prefix) + len(decode_prompt) + args.decode_tokens)))
    spec: dict[str, Any] = {
        "model": model,
        "kv_cache_memory_bytes": kv_bytes,
        "max_model_len": len(prefix) + 64 + args.decode_tokens,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "membrain": "off",
        "decode_prompt": decode_prompt,
        "decode_tokens": args.decode_tokens,
        "arrive_after": args.arrive_after,
        "tail_tokens": args.tail_tokens,
        "long_prompts": [prefix, prefix],
    }
    server = None
    env = C.base_env()
    try:
        if mode == "membrain":
            ucx = args.transport == "ucx"
            server = C.start_server("4GiB", wd / "server.log", nice=args.server_nice, ucx=ucx)
            if server is None:
                raise SystemExit(f"the local Membrain server did not start; see {wd / 'server.log'}")
            endpoint = server.ucx_endpoint if ucx else server.endpoint
            if endpoint is None:
                raise SystemExit(
                    "the server has no UCX listener: this build lacks UCX (native_info()['ucx'])"
                )
            extra = {
                "endpoint": endpoint,
                "namespace": f"stall-{int(time.time())}",
                "cpu_cache_size": "2GiB",
            }
            store = {
                "model": model,
                "prompts": [prefix],
                "max_tokens": 1,
                "membrain": "explicit",
                "extra": extra,
                "kv_cache_memory_bytes": kv_bytes,
                "max_model_len": spec["max_model_len"],
                "max_num_batched_tokens": args.max_num_batched_tokens,
            }
            a = C.run_instance(store, env, wd, "stall_A", timeout=3600)
            if a["rc"]:
                raise SystemExit(f"instance A failed: see {a['log_path']}")
            spec.update(membrain="explicit", extra=extra)
        b = C.run_instance(spec, env, wd, f"stall_{mode}", timeout=3600, module="membrain.bench.stall_driver")
        if b["rc"] or not b["out"].get("phases"):
            raise SystemExit(f"the async engine run failed: see {b['log_path']}")
    finally:
        if server is not None:
            server.stop()
    first, again = (gap_stats(p) for p in b["out"]["phases"])
    row: dict[str, Any] = {"mode": mode, "first": first, "local_hit": again}
    row["compute_step_vs_local_hit"] = first["compute_step_s"] / again["compute_step_s"]
    if mode == "membrain":
        loads = C.parse_loads(b["log"])
        row["load"] = loads[0] if loads else None
        row["hits"] = C.hit_totals(b["log"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-tokens", type=int, default=8000)
    p.add_argument("--shape", choices=sorted(SHAPES), default="wide")
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=1000,
        help="the most tokens the decoding stream generates (it stops --tail-tokens after the long "
        "request's first token)",
    )
    p.add_argument(
        "--tail-tokens", type=int, default=20, help="stream tokens after the long request's first token"
    )
    p.add_argument("--arrive-after", type=int, default=40, help="stream tokens before the long request")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="vLLM's per-step token budget (chunked prefill)",
    )
    p.add_argument("--modes", default="off,membrain")
    p.add_argument(
        "--server-nice",
        type=int,
        default=0,
        help="niceness of the local Membrain server's threads; 19 stands in for a server on its own "
        "host (production), 0 (default) lets it take CPU from the engine as on one box",
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "ucx"),
        default="tcp",
        help="how the instances reach the local server: tcp (default) or ucx (on one host UCX moves "
        "values through shared memory: the loader's thread reads them from the server's memory)",
    )
    p.add_argument("--model-dir", default=None)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    wd = Path(a.workdir or C.tmpdir("membrain-stall-"))
    wd.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[a.shape]
    model = shape_model(a.shape, a.model_dir)
    prefix = C.make_prompts(1, a.prefix_tokens, seed=7)[0]
    decode_prompt = C.make_prompts(1, 64, seed=8)[0]
    rows = [run_mode(m, model, prefix, decode_prompt, a, wd) for m in a.modes.split(",")]
    info = machine_info()
    print(
        f"machine: {info['cpu_model']} ({info['cpu_cores']} cores); shape {a.shape}, prefix {a.prefix_tokens}"
    )
    print(
        f"{'mode':>9} {'phase':>10} {'median gap':>11} {'max wait gap':>13} {'ratio':>6} {'excess':>9} "
        f"{'compute step':>13} {'TTFT':>7}"
    )
    for r in rows:
        for ph in ("first", "local_hit"):
            s = r[ph]
            print(
                f"{r['mode']:>9} {ph:>10} {s['median_gap_before_s'] * 1e3:9.1f}ms "
                f"{s['max_gap_while_waiting_s'] * 1e3:11.1f}ms {s['max_wait_gap_ratio']:5.1f}x "
                f"{s['excess_while_waiting_s'] * 1e3:7.0f}ms "
                f"{s['compute_step_s'] * 1e3:11.1f}ms {s['ttft_s']:6.2f}s"
            )
        print(f"{r['mode']:>9} compute step vs local hit: {r['compute_step_vs_local_hit']:.2f}x")
        for ph in ("first", "local_hit"):
            if not r[ph]["stream_covered_wait"]:
                print(
                    f"{r['mode']:>9} {ph}: the stream ended before the long request's first token; "
                    "its gaps do not cover the wait (raise --decode-tokens)"
                )
    if a.json:
        doc = {
            "benchmark": "stall",
            "machine": info,
            "shape": a.shape,
            "model": shape | {"kv_bytes_per_token": kv_bytes_per_token(shape)},
            "prefix_tokens": a.prefix_tokens,
            "max_num_batched_tokens": a.max_num_batched_tokens,
            "server_nice": a.server_nice,
            "transport": a.transport,
            "rows": rows,
        }
        Path(a.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
