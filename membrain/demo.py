"""``membrain demo``: two vLLM instances, one after the other, on the same long-prefix prompts.

Starts a local Membrain server, builds a small random Llama under ``~/.cache/membrain/demo-model``
(or ``--model-dir``) if absent, runs instance A (cold; stores into Membrain) and then a fresh
instance B (served from Membrain), and prints per prompt: prompt tokens, tokens from each tier,
TTFT cold vs warm and the speedup.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from membrain.bench import common as C


def main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="membrain demo", description=__doc__)
    p.add_argument("--model-dir", default=os.path.expanduser("~/.cache/membrain/demo-model"))
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--endpoint", default=None, help="use a running Membrain server instead of starting one")
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    wd = Path(a.workdir or C.tmpdir("membrain-demo-"))
    wd.mkdir(parents=True, exist_ok=True)
    print(f"model: {a.model_dir} (random-weight Llama, built locally if absent)")
    model = C.ensure_model(a.model_dir)
    server = None
    endpoint = a.endpoint
    if endpoint is None:
        server = C.start_server("2GiB", wd / "server.log")
        if server is None:
            print(f"error: the local Membrain server did not start; see {wd / 'server.log'}", file=sys.stderr)
            return 2
        endpoint = server.endpoint
    print(f"Membrain server: {endpoint}; logs in {wd}")
    prompts = C.make_prompts(a.prompts, a.prompt_tokens, seed=7)
    spec = {
        "model": model,
        "prompts": prompts,
        "max_tokens": 1,
        "membrain": "explicit",
        "extra": {"endpoint": endpoint, "namespace": "demo", "cpu_cache_size": "1GiB"},
        "kv_cache_memory_bytes": 512 << 20,
        "max_model_len": a.prompt_tokens + 64,
    }
    try:
        print("instance A (cold) ...", flush=True)
        ra = C.run_instance(spec, C.base_env(), wd, "demo_A")
        print("instance B (fresh process, same prompts) ...", flush=True)
        rb = C.run_instance(spec, C.base_env(), wd, "demo_B")
    finally:
        if server is not None:
            server.stop()
    if ra["rc"] or rb["rc"]:
        print(f"vLLM failed: see {ra['log_path']} and {rb['log_path']}", file=sys.stderr)
        return 1
    # vLLM numbers requests 0, 1, ... in the order the driver submits them (one per prompt).
    hits = {rid.split("-")[0]: h for rid, h in C.parse_hits(rb["log"]).items()}
    print(
        f"\n{'prompt':>6} {'tokens':>7} {'host':>6} {'remote':>7} {'TTFT cold':>10} {'TTFT warm':>10} {'speedup':>8}"
    )
    for i, (x, y) in enumerate(zip(ra["results"], rb["results"])):
        h = hits.get(str(i), {"host": 0, "remote": 0})
        print(
            f"{i:>6} {x['prompt_tokens']:>7} {h['host']:>6} {h['remote']:>7} {x['seconds']:>9.2f}s "
            f"{y['seconds']:>9.2f}s {x['seconds'] / y['seconds']:>7.1f}x"
            + ("" if x["tokens"] == y["tokens"] else "  (tokens differ!)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
