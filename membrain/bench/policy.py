"""`membrain bench policy`: replays a request trace against the real eviction policies.

The trace is Mooncake's format (one JSON object per line with ``hash_ids``, the chained prefix
blocks of the request; ``input_length`` in tokens is optional). Each policy runs in the C++ code
the server and the host tier use (``membrain._native.PolicyIndex`` over
``csrc/server/list_policy.*``), with a capacity in blocks of a fraction of the trace's distinct
blocks. For every request, in file order: the prefix hit is the number of leading blocks held
before it; then its blocks are admitted (tail first, see ``policy_index.h``).

Rows: ``{"policy", "admission", "capacity_fraction", "capacity_blocks", "prefix_hit_ratio",
"byte_hit_ratio"}`` per policy and fraction, plus ``unlimited`` (a cache that never evicts) and
``optimum`` (offline: evicts the block whose next use is farthest, the deepest block of a chain
first among equals - Belady's rule; it needs the future, so it is computed here, not by a
policy). A policy name may carry ``+seen`` (admission on second sight). ``byte_hit_ratio``
weighs each hit block by its tokens (the last block of a request may be partial).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

BLOCK_TOKENS = 512


def load_trace(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                d = json.loads(line)
                out.append(
                    {
                        "hash_ids": [int(h) for h in d["hash_ids"]],
                        "input_length": int(d.get("input_length", BLOCK_TOKENS * len(d["hash_ids"]))),
                        "priority": int(d.get("priority", 0)),
                    }
                )
    return out


def _block_tokens(req: dict[str, Any], i: int) -> int:
    return max(0, min(BLOCK_TOKENS, int(req["input_length"]) - i * BLOCK_TOKENS))


def _ratios(trace: list[dict[str, Any]], hits: list[int]) -> tuple[float, float]:
    total_blocks = sum(len(r["hash_ids"]) for r in trace)
    total_tokens = sum(sum(_block_tokens(r, i) for i in range(len(r["hash_ids"]))) for r in trace)
    hit_tokens = sum(sum(_block_tokens(r, i) for i in range(n)) for r, n in zip(trace, hits))
    return (
        sum(hits) / total_blocks if total_blocks else 0.0,
        hit_tokens / total_tokens if total_tokens else 0.0,
    )


def replay(trace: list[dict[str, Any]], policy: str, capacity: int) -> list[int]:
    """Prefix hits per request with the real policy ``policy`` (``NAME`` or ``NAME+seen``)."""
    from membrain import _native

    name, _, adm = policy.partition("+")
    index = _native.PolicyIndex(name, max(1, capacity), adm or "all")
    return list(index.replay_ids([r["hash_ids"] for r in trace], [r["priority"] for r in trace]))


def optimum(trace: list[dict[str, Any]], capacity: int) -> list[int]:
    """Offline optimum: after each request, evict the blocks whose next use is farthest."""
    uses: dict[int, deque[int]] = defaultdict(deque)
    for t, r in enumerate(trace):
        for h in r["hash_ids"]:
            uses[h].append(t)
    held: dict[int, int] = {}  # block -> next use it is keyed by
    heap: list[tuple[int, int, int]] = []
    hits = []
    never = len(trace) + 1
    for r in trace:
        ids = r["hash_ids"]
        n = 0
        for h in ids:
            if h not in held:
                break
            n += 1
        hits.append(n)
        for h in ids:
            uses[h].popleft()
        for i, h in enumerate(ids):
            nxt = uses[h][0] if uses[h] else never
            held[h] = nxt
            heapq.heappush(heap, (-nxt, -i, h))
        while len(held) > capacity:
            negnxt, _, h = heapq.heappop(heap)
            if held.get(h) == -negnxt:
                del held[h]
    return hits


def run(trace: list[dict[str, Any]], fractions: list[float], policies: list[str]) -> list[dict[str, Any]]:
    distinct = len({h for r in trace for h in r["hash_ids"]})
    rows: list[dict[str, Any]] = []

    def row(policy: str, frac: float, cap: int, hits: list[int]) -> None:
        p, b = _ratios(trace, hits)
        _, _, adm = policy.partition("+")
        rows.append(
            {
                "policy": policy,
                "admission": adm or "all",
                "capacity_fraction": frac,
                "capacity_blocks": cap,
                "prefix_hit_ratio": round(p, 4),
                "byte_hit_ratio": round(b, 4),
            }
        )

    for frac in fractions:
        cap = max(1, int(frac * distinct))
        for pol in policies:
            row(pol, frac, cap, replay(trace, pol, cap))
        row("optimum", frac, cap, optimum(trace, cap))
    row("unlimited", 1.0, distinct, replay(trace, "lru", distinct))
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    unlimited = None
    for r in rows:
        if r["policy"] == "unlimited":
            unlimited = r["prefix_hit_ratio"]
        else:
            by[r["policy"]].append((r["capacity_fraction"], r["prefix_hit_ratio"]))
    for name, pts in by.items():
        pts.sort()
        style = "--" if name == "optimum" else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
    if unlimited is not None:
        ax.axhline(unlimited, color="gray", linestyle=":", label="unlimited")
    ax.set_xlabel("capacity (fraction of distinct blocks)")
    ax.set_ylabel("prefix hit ratio")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from membrain import _native

    parser = argparse.ArgumentParser(
        prog="membrain bench policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trace", required=True, help="JSONL trace (Mooncake format: hash_ids per request)")
    parser.add_argument(
        "--capacity-fraction",
        default="0.05,0.1,0.25",
        help="cache sizes as fractions of the trace's distinct blocks (comma-separated)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="policies to replay, comma-separated (NAME or NAME+seen for admission on second sight); "
        f"default: {', '.join(_native.eviction_policies())} and each +seen",
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine description here")
    parser.add_argument("--png", metavar="PATH", help="plot prefix hit ratio vs capacity here")
    args = parser.parse_args(argv)

    fractions = [float(x) for x in args.capacity_fraction.split(",") if x.strip()]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        parser.error("--capacity-fraction: fractions in (0, 1]")
    known = set(_native.eviction_policies())
    if args.policy:
        policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    else:
        policies = [*_native.eviction_policies(), *(f"{p}+seen" for p in _native.eviction_policies())]
    if "lru" not in policies:
        policies.insert(0, "lru")  # the baseline is always reported
    for p in policies:
        name, _, adm = p.partition("+")
        if (name not in known and not name.startswith("slru:")) or adm not in ("", "seen"):
            parser.error(
                f"--policy {p!r}: known policies {sorted(known)} (slru:G sets its ghost factor), optionally with +seen"
            )

    trace = load_trace(args.trace)
    if not trace:
        parser.error(f"{args.trace}: no requests")
    distinct = len({h for r in trace for h in r["hash_ids"]})
    total = sum(len(r["hash_ids"]) for r in trace)
    print(f"trace {args.trace}: {len(trace)} requests, {total} blocks, {distinct} distinct")
    rows = run(trace, fractions, policies)
    default = str(_native.DEFAULT_EVICTION_POLICY)
    lru = {r["capacity_fraction"]: r["prefix_hit_ratio"] for r in rows if r["policy"] == "lru"}
    print(f"{'policy':>12} {'fraction':>8} {'blocks':>7} {'prefix':>7} {'bytes':>7} {'vs lru':>7}")
    for r in rows:
        base = lru.get(r["capacity_fraction"])
        vs = f"{r['prefix_hit_ratio'] / base:.3f}" if base else "-"
        print(
            f"{r['policy']:>12} {r['capacity_fraction']:>8.3f} {r['capacity_blocks']:>7} "
            f"{r['prefix_hit_ratio']:>7.3f} {r['byte_hit_ratio']:>7.3f} {vs:>7}"
        )
    if args.json:
        from membrain.bench.machine import machine_info

        out = {
            "benchmark": "policy",
            "trace": str(args.trace),
            "requests": len(trace),
            "blocks": total,
            "distinct_blocks": distinct,
            "default_policy": default,
            "machine": machine_info(),
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    if args.png:
        plot(rows, Path(args.png), f"{Path(args.trace).name}: prefix hit ratio")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
