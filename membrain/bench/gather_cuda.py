"""GPU part of the gather benchmark: Membrain's CUDA gather/scatter against the physical limits
and the obvious alternatives.

``run_cuda_gather_bench(args)`` returns one dict per measurement; ``acceptance_summary(rows)``
turns them into the issue's acceptance figures. ``membrain/bench/gather.py`` (the CPU
benchmark and CLI) calls these when a CUDA device is present; ``python -m
membrain.bench.gather_cuda --out FILE.json`` runs them alone (scripts/gpu_check.sh does).

Attributes read from ``args`` (all optional): ``device`` (int, default 0), ``quick`` (bool:
fewer iterations, for CI-sized runs), ``iters`` (timed runs per point), ``warmup``.

Method: every KV byte is random (never zeros), outputs are poisoned once and each op's result is
checked against the device-to-device gather before timing. Each timed run is bracketed by CUDA
events on the stream; the reported time is the median over the runs after warm-up.

Then vLLM's own per-layer views (create_kv_cache_views, needs vllm) at 16 KiB pages in the
layouts CUDA backends use: LBNHC (the default; pages one run, dims permuted), BLNHC (a block of
all layers is one run) and LHBNC (one run per KV head), each op against the same limits as the
rows above, measured in the same run; their rows carry "layout".

Bandwidth convention: GB/s = packed payload bytes / time (1 GB = 1e9 B), each byte counted
once, for every op and every limit alike. A device-to-device copy therefore moves twice that in
HBM traffic (read + write); ratios are unaffected because limits use the same convention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from membrain import _native, ops

KIB = 1024
MIB = 1024 * KIB
BW_CONVENTION = "payload bytes / time, each byte counted once (device-to-device HBM traffic is 2x)"

# (page_bytes, layers, blocks): 4 KiB..1 MiB pages; mostly 256 MiB per transfer (steady-state
# bandwidth), plus small transfers where per-call overhead shows.
CONFIGS = [
    (4 * KIB, 32, 2048),
    (16 * KIB, 32, 512),
    (16 * KIB, 8, 16),
    (16 * KIB, 64, 64),
    (64 * KIB, 32, 128),
    (256 * KIB, 16, 64),
    (1 * MIB, 8, 32),
]
QUICK_CONFIGS = [
    (4 * KIB, 32, 1024),
    (16 * KIB, 32, 512),
    (16 * KIB, 8, 16),
    (64 * KIB, 32, 64),
    (1 * MIB, 8, 16),
]


def _median_ms(torch, stream, fn: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    stream.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_cuda_gather_bench(args: Any = None) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda_gather_bench needs a CUDA device (torch.cuda.is_available() is False)")
    if not hasattr(_native, "gather_cuda"):
        raise RuntimeError("this build of membrain._native has no CUDA kernels")
    device = int(getattr(args, "device", 0) or 0)
    quick = bool(getattr(args, "quick", False))
    iters = int(getattr(args, "iters", 0) or (10 if quick else 30))
    warmup = int(getattr(args, "warmup", 0) or 3)
    loop_iters = 2 if quick else 3  # the per-page loop is slow; few runs suffice
    configs = QUICK_CONFIGS if quick else CONFIGS

    dev = torch.device("cuda", device)
    torch.cuda.set_device(dev)
    gpu = torch.cuda.get_device_name(dev)
    stream = torch.cuda.current_stream(dev)
    max_bytes = max(p * l * b for p, l, b in configs)
    # One output of each kind, reused: pinned allocation is slow and would distort nothing but
    # the run time.
    pinned = torch.full((max_bytes,), 0xA5, dtype=torch.uint8).pin_memory()
    dev_out = torch.full((max_bytes,), 0xA5, dtype=torch.uint8, device=dev)
    dev_src = torch.randint(0, 256, (max_bytes,), dtype=torch.uint8, device=dev)
    rows: list[dict] = []

    for page, layers, blocks in configs:
        total_blocks = 2 * blocks  # ids are a random half of the cache, as after eviction churn
        nbytes = page * layers * blocks
        backing = torch.randint(0, 256, (layers * total_blocks * page,), dtype=torch.uint8, device=dev)
        kv = [
            backing[l * total_blocks * page : (l + 1) * total_blocks * page].view(total_blocks, page)
            for l in range(layers)
        ]
        rng = np.random.default_rng(page + layers + blocks)
        ids = np.sort(rng.permutation(total_blocks)[:blocks]).astype(np.int64)
        rng.shuffle(ids)
        ids_dev = torch.as_tensor(ids, device=dev)
        desc = ops.describe_kv_caches(kv)
        out_h = pinned[:nbytes]
        out_d = dev_out[:nbytes]
        src_h = pinned[:nbytes]
        src_d = dev_src[:nbytes]

        def timed(fn, n=iters):
            return _median_ms(torch, stream, fn, warmup if n == iters else 1, n)

        # Correctness first: every packed result equals the device gather.
        ops.gather_blocks(desc, ids, out_d)
        want = out_d.clone()
        for mode in ("mapped", "staged"):
            out_h.fill_(0xA5)
            ops.gather_blocks(desc, ids, out_h, mode=mode)
            stream.synchronize()
            if not torch.equal(out_h.to(dev), want):
                raise AssertionError(f"gather into pinned host ({mode}) differs from the device gather")

        kvp = kv  # already [blocks, page] byte views
        outp_h = out_h.view(blocks * layers, page)
        outp_d = out_d.view(blocks * layers, page)
        id_list = ids.tolist()

        def loop_into(outp):
            def run():
                for i, b in enumerate(id_list):
                    for l in range(layers):
                        outp[i * layers + l].copy_(kvp[l][b], non_blocking=True)

            return run

        def index_select_into(out):
            def run():
                g = torch.stack([kvp[l].index_select(0, ids_dev) for l in range(layers)], dim=1)
                out.view(blocks, layers, page).copy_(g, non_blocking=True)

            return run

        t = {}
        t["limit", "d2h_contiguous"] = timed(lambda: out_h.copy_(src_d, non_blocking=True))
        t["limit", "h2d_contiguous"] = timed(lambda: out_d.copy_(src_h, non_blocking=True))
        t["limit", "d2d_contiguous"] = timed(lambda: out_d.copy_(src_d, non_blocking=True))
        for mode in ("mapped", "staged", "auto"):
            t["gather_pinned", mode] = timed(lambda m=mode: ops.gather_blocks(desc, ids, out_h, mode=m))
        t["gather_device", "kernel"] = timed(lambda: ops.gather_blocks(desc, ids, out_d))
        t["gather_pinned", "per_page_loop"] = timed(loop_into(outp_h), loop_iters)
        t["gather_device", "per_page_loop"] = timed(loop_into(outp_d), loop_iters)
        t["gather_pinned", "torch_index_select"] = timed(index_select_into(out_h))
        t["gather_device", "torch_index_select"] = timed(index_select_into(out_d))
        ops.gather_blocks(desc, ids, out_h)  # real KV bytes as the scatter source
        ops.gather_blocks(desc, ids, out_d)
        for mode in ("mapped", "staged", "auto"):
            t["scatter_pinned", mode] = timed(lambda m=mode: ops.scatter_blocks(out_h, desc, ids, mode=m))
        t["scatter_device", "kernel"] = timed(lambda: ops.scatter_blocks(out_d, desc, ids))

        limit_of = {
            "gather_pinned": "d2h_contiguous",
            "gather_device": "d2d_contiguous",
            "scatter_pinned": "h2d_contiguous",
            "scatter_device": "d2d_contiguous",
            "limit": None,
        }

        def gbps(ms):
            return nbytes / (ms * 1e-3) / 1e9

        for (op, mode), ms in t.items():
            limit_key = limit_of[op]
            limit = gbps(t["limit", limit_key]) if limit_key else None
            loop_ms = t.get((op, "per_page_loop"))
            rows.append(
                {
                    "op": op,
                    "mode": mode,
                    "page_bytes": page,
                    "layers": layers,
                    "blocks": blocks,
                    "bytes": nbytes,
                    "ms": round(ms, 4),
                    "gbps": round(gbps(ms), 2),
                    "limit": limit_key,
                    "limit_gbps": round(limit, 2) if limit else None,
                    "ratio_to_limit": round(gbps(ms) / limit, 3) if limit else None,
                    "ratio_to_per_page_loop": round(loop_ms / ms, 2)
                    if loop_ms and mode != "per_page_loop"
                    else None,
                    "gpu": gpu,
                    "bw_convention": BW_CONVENTION,
                    "auto_mode": _native.cuda_default_host_mode,
                }
            )
        del backing, kv, want
        torch.cuda.empty_cache()
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM layout rows skipped: vllm is not installed", file=sys.stderr)
        return rows
    rows += _layout_rows(torch, dev, stream, pinned, dev_out, dev_src, gpu, warmup, iters)
    return rows


# vLLM layouts at 16 KiB pages: bf16, head size 64 (C = 256 B), 4 KV heads, 16 tokens; 32 layers x
# 512 blocks = 256 MiB per transfer, like the 16 KiB row above.
LAYOUTS = ("LBNHC", "BLNHC", "LHBNC")
LAYOUT_BLOCK_SIZE, LAYOUT_KV_HEADS, LAYOUT_HEAD_SIZE = 16, 4, 64
LAYOUT_LAYERS, LAYOUT_BLOCKS = 32, 512


def _layout_rows(
    torch: Any,
    dev: Any,
    stream: Any,
    pinned: Any,
    dev_out: Any,
    dev_src: Any,
    gpu: str,
    warmup: int,
    iters: int,
) -> list[dict[str, Any]]:
    from membrain.bench.vllm_kv import vllm_kv_caches

    rows = []
    layers, blocks = LAYOUT_LAYERS, LAYOUT_BLOCKS
    page = 16 * KIB
    nbytes = page * layers * blocks
    out_h, out_d, src_d = pinned[:nbytes], dev_out[:nbytes], dev_src[:nbytes]

    def timed(fn: Callable[[], Any]) -> float:
        return _median_ms(torch, stream, fn, warmup, iters)

    limits = {
        "d2h_contiguous": timed(lambda: out_h.copy_(src_d, non_blocking=True)),
        "h2d_contiguous": timed(lambda: out_d.copy_(out_h, non_blocking=True)),
        "d2d_contiguous": timed(lambda: out_d.copy_(src_d, non_blocking=True)),
    }
    for layout in LAYOUTS:
        raw, kv = vllm_kv_caches(
            layout,
            layers,
            2 * blocks,
            LAYOUT_BLOCK_SIZE,
            LAYOUT_KV_HEADS,
            LAYOUT_HEAD_SIZE,
            torch.bfloat16,
            device=str(dev),
        )
        raw.view(torch.uint8).random_(0, 256)
        desc = ops.describe_kv_caches(kv, 2 * blocks)
        assert desc.page_bytes == page, desc
        ids = np.random.default_rng(7).permutation(2 * blocks)[:blocks].astype(np.int64)
        # Correctness first: device and pinned gathers agree, and a page equals its logical view.
        ops.gather_blocks(desc, ids, out_d)
        out_h.fill_(0xA5)
        ops.gather_blocks(desc, ids, out_h)
        stream.synchronize()
        if not torch.equal(out_h.to(dev), out_d):
            raise AssertionError(f"{layout}: gather into pinned host differs from the device gather")
        i, l = blocks // 2, layers - 1
        logical = kv[l][int(ids[i])]
        if desc.page_order == "NHC":
            logical = logical.permute(1, 0, 2)
        if not torch.equal(
            out_d.view(blocks, layers, page)[i, l], logical.contiguous().reshape(-1).view(torch.uint8)
        ):
            raise AssertionError(f"{layout}: gathered page differs from the logical view")
        t = {
            ("gather_pinned", "auto", "d2h_contiguous"): timed(lambda: ops.gather_blocks(desc, ids, out_h)),
            ("gather_device", "kernel", "d2d_contiguous"): timed(lambda: ops.gather_blocks(desc, ids, out_d)),
        }
        ops.gather_blocks(desc, ids, out_h)  # real KV bytes as the scatter source
        ops.gather_blocks(desc, ids, out_d)
        t["scatter_pinned", "auto", "h2d_contiguous"] = timed(lambda: ops.scatter_blocks(out_h, desc, ids))
        t["scatter_device", "kernel", "d2d_contiguous"] = timed(lambda: ops.scatter_blocks(out_d, desc, ids))
        for (op, mode, limit_key), ms in t.items():
            gbps = nbytes / (ms * 1e-3) / 1e9
            limit = nbytes / (limits[limit_key] * 1e-3) / 1e9
            rows.append(
                {
                    "op": op,
                    "mode": mode,
                    "layout": layout,
                    "page_order": desc.page_order,
                    "runs_per_block": 1
                    if desc.block_is_one_run
                    else layers * desc.sub_count * desc.run_count,
                    "page_bytes": page,
                    "layers": layers,
                    "blocks": blocks,
                    "bytes": nbytes,
                    "ms": round(ms, 4),
                    "gbps": round(gbps, 2),
                    "limit": limit_key,
                    "limit_gbps": round(limit, 2),
                    "ratio_to_limit": round(gbps / limit, 3),
                    "ratio_to_per_page_loop": None,
                    "gpu": gpu,
                    "bw_convention": BW_CONVENTION,
                    "auto_mode": _native.cuda_default_host_mode,
                }
            )
        del raw, kv
        torch.cuda.empty_cache()
    return rows


def acceptance_summary(rows: list[dict]) -> list[dict]:
    """The issue's acceptance figures, computed from the rows.

    - gather into pinned host >= 0.9x the contiguous D2H copy (worst config of >= 64 MiB, for the
      "auto" mode and for the better of mapped/staged per config);
    - >= 3x the per-page copy loop at 16 KiB pages (pinned host, auto mode);
    - device-to-device gather >= 0.8x the contiguous device copy (configs of >= 64 MiB).
    """

    def pick(op, mode, pred=lambda r: True):  # the raw-page rows; layout rows are checked below
        return [r for r in rows if r["op"] == op and r["mode"] == mode and "layout" not in r and pred(r)]

    def large(r):  # bandwidth targets are for transfers where fixed per-call costs vanish
        return r["bytes"] >= 64 * MIB

    out = []
    auto = pick("gather_pinned", "auto", large)
    if auto:
        worst = min(auto, key=lambda r: r["ratio_to_limit"])
        out.append(
            {
                "check": "gather->pinned (auto) / contiguous D2H, worst config >= 64 MiB",
                "value": worst["ratio_to_limit"],
                "target": 0.9,
                "pass": worst["ratio_to_limit"] >= 0.9,
                "at": f"page {worst['page_bytes']} B, {worst['layers']} layers, {worst['blocks']} blocks",
            }
        )
        best = {}
        for r in rows:
            if r["op"] == "gather_pinned" and r["mode"] in ("mapped", "staged") and large(r):
                key = (r["page_bytes"], r["layers"], r["blocks"])
                if key not in best or r["ratio_to_limit"] > best[key]["ratio_to_limit"]:
                    best[key] = r
        worst_best = min(best.values(), key=lambda r: r["ratio_to_limit"])
        out.append(
            {
                "check": "gather->pinned (better of mapped/staged) / contiguous D2H, worst config >= 64 MiB",
                "value": worst_best["ratio_to_limit"],
                "target": 0.9,
                "pass": worst_best["ratio_to_limit"] >= 0.9,
                "at": f"page {worst_best['page_bytes']} B, {worst_best['layers']} layers, {worst_best['blocks']} blocks "
                f"({worst_best['mode']})",
            }
        )
    at16 = pick("gather_pinned", "auto", lambda r: r["page_bytes"] == 16 * KIB)
    if at16:
        worst = min(at16, key=lambda r: r["ratio_to_per_page_loop"])
        out.append(
            {
                "check": "gather->pinned (auto) / per-page copy loop, 16 KiB pages",
                "value": worst["ratio_to_per_page_loop"],
                "target": 3.0,
                "pass": worst["ratio_to_per_page_loop"] >= 3.0,
                "at": f"{worst['layers']} layers, {worst['blocks']} blocks",
            }
        )
    d2d = pick("gather_device", "kernel", large)
    if d2d:
        worst = min(d2d, key=lambda r: r["ratio_to_limit"])
        out.append(
            {
                "check": "gather device->device / contiguous D2D copy (>= 64 MiB)",
                "value": worst["ratio_to_limit"],
                "target": 0.8,
                "pass": worst["ratio_to_limit"] >= 0.8,
                "at": f"page {worst['page_bytes']} B, {worst['layers']} layers, {worst['blocks']} blocks",
            }
        )
    # vLLM layouts at 16 KiB pages, the CPU benchmark's targets: LBNHC >= 0.8x, whole-block
    # BLNHC >= 0.9x the contiguous copy of the same bytes.
    for r in rows:
        target = {"LBNHC": 0.8, "BLNHC": 0.9}.get(r.get("layout", ""))
        if target is not None and r["op"] in ("gather_pinned", "gather_device"):
            out.append(
                {
                    "check": f"{r['op']} ({r['mode']}) {r['layout']} / contiguous {r['limit']}, 16 KiB pages",
                    "value": r["ratio_to_limit"],
                    "target": target,
                    "pass": r["ratio_to_limit"] >= target,
                    "at": f"{r['layers']} layers, {r['blocks']} blocks",
                }
            )
    return out


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<15} {'mode':<19} {'page':>8} {'L':>3} {'blocks':>6} {'GB/s':>8} {'limit':>8} {'x limit':>8} {'x loop':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['op']:<15} {(r['mode'] + ' ' + r.get('layout', '')).strip():<19} {r['page_bytes']:>8} {r['layers']:>3} {r['blocks']:>6} {r['gbps']:>8.1f} "
            f"{(r['limit_gbps'] or 0):>8.1f} {(r['ratio_to_limit'] or 0):>8.3f} {(r['ratio_to_per_page_loop'] or 0):>7.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CUDA gather/scatter benchmark (needs a CUDA device)")
    p.add_argument("--out", help="write {'rows': [...], 'acceptance': [...]} as JSON here")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer configs and iterations")
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0)
    args = p.parse_args(argv)
    rows = run_cuda_gather_bench(args)
    acc = acceptance_summary(rows)
    print(format_table(rows))
    print()
    for a in acc:
        print(
            f"{'PASS' if a['pass'] else 'FAIL'}  {a['check']}: {a['value']} (target {a['target']}, at {a['at']})"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "gpu": rows[0]["gpu"] if rows else None,
                    "bw_convention": BW_CONVENTION,
                    "auto_mode": _native.cuda_default_host_mode,
                    "rows": rows,
                    "acceptance": acc,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
