"""Gather/scatter bandwidth: Membrain's ops beside torch and the physical limit, same run.

For each page size and (layers, blocks) shape, on CPU tensors:
  * membrain gather and scatter (multi-threaded C++),
  * torch index_select + copy (what a Python connector would write),
  * a per-page copy loop (torch copy_ per page),
  * the limit: one contiguous copy of the same bytes by the same number of threads (the
    faster of glibc memcpy and a streaming-store copy).
Gather, scatter and the limit are timed in rounds, each once per round, and each ratio is the
median over rounds of the limit's time over the op's: a shared host drifts by tens of percent
within seconds, which ratios of medians taken one after the other would carry.
Then, at 16 KiB pages, the same for vLLM's own per-layer views (built with
create_kv_cache_views) in the layouts that matter: LBHNC (contiguous pages), LBNHC (CUDA's
default: pages one run, dims permuted), BLNHC (a block of all layers is one run) and LHBNC (one
run per KV head), each against its own limit measured in the same run. Needs vllm; skipped
without it.
With a CUDA device, the GPU rows come from membrain.bench.gather_cuda.

Usage: membrain bench gather [--quick] [--json PATH] [--threads N] [--layouts-only] [--layout-passes N]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

PAGE_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
TARGET_BYTES = 128 << 20  # per measurement: well past the last-level cache


def _shapes(page: int, quick: bool) -> list[tuple[int, int]]:
    """(layers, blocks) pairs moving about TARGET_BYTES each."""
    target = (32 << 20) if quick else TARGET_BYTES
    shapes = []
    for layers in (8,) if quick else (1, 8, 32):
        blocks = max(1, target // (page * layers))
        shapes.append((layers, blocks))
    return shapes


def _copy_vs_limit(desc: Any, ids: Any, out: Any, repeats: int) -> dict[str, float]:
    """Gather into ``out``, scatter back from a copy of it, and the limit, timed in rounds (see
    timing.interleaved_seconds): the limit of a round is the faster of glibc's memcpy and a
    streaming-store copy of the same bytes by the same threads, and each ratio is the median
    over rounds of limit time / op time. The limit copies run last in a round, so what they
    leave in the cache cannot help the ops."""
    from membrain import _native, ops
    from membrain.bench.timing import gbps, interleaved_seconds, median_ratio

    src = out.clone()
    limit_dst = out.new_empty(out.shape)
    nbytes = out.numel()
    t = interleaved_seconds(
        {
            "gather": lambda: ops.gather_blocks(desc, ids, out),
            "scatter": lambda: ops.scatter_blocks(src, desc, ids),
            "memcpy": lambda: _native.memcpy_cpu(limit_dst.data_ptr(), src.data_ptr(), nbytes),
            "stream": lambda: _native.memcpy_cpu(limit_dst.data_ptr(), src.data_ptr(), nbytes, True),
        },
        repeats=repeats,
    )
    limit = [min(a, b) for a, b in zip(t["memcpy"], t["stream"], strict=True)]
    med = lambda name: float(np.median(t[name]))  # noqa: E731
    return {
        "gather_gbps": gbps(nbytes, med("gather")),
        "scatter_gbps": gbps(nbytes, med("scatter")),
        "limit_memcpy_gbps": gbps(nbytes, float(np.median(limit))),
        "gather_vs_limit": median_ratio(limit, t["gather"]),
        "scatter_vs_limit": median_ratio(limit, t["scatter"]),
    }


def _cpu_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from membrain import ops
    from membrain.bench.timing import gbps, median_seconds

    rng = np.random.default_rng(0)
    rows = []
    for page in PAGE_SIZES if not args.quick else (4 << 10, 16 << 10, 1 << 20):
        for layers, blocks in _shapes(page, args.quick):
            num_blocks = blocks * 2  # gather a random half, in random order
            kv = [torch.randint(0, 256, (num_blocks, page), dtype=torch.uint8) for _ in range(layers)]
            ids = rng.permutation(num_blocks)[:blocks].astype(np.int64)
            ids_t = torch.from_numpy(ids)
            nbytes = blocks * layers * page
            out = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
            desc = ops.describe_kv_caches(kv)
            out3 = out.view(blocks, layers, page)

            timed = _copy_vs_limit(desc, ids, out, args.repeats)

            def torch_index_select():
                for l, layer in enumerate(kv):
                    out3[:, l, :].copy_(torch.index_select(layer, 0, ids_t))

            t_torch = median_seconds(torch_index_select, repeats=max(3, args.repeats // 2), warmup=1)

            loop_ids = ids[: min(blocks, 512)]  # the loop is slow; time a prefix and scale per byte

            def per_page_loop():
                for i, b in enumerate(loop_ids):
                    for l, layer in enumerate(kv):
                        out3[i, l].copy_(layer[b])

            loop_bytes = len(loop_ids) * layers * page
            t_loop = median_seconds(per_page_loop, repeats=3, warmup=1)

            # Correctness guard: a benchmark of a wrong copy is worthless.
            ops.gather_blocks(desc, ids, out)
            check = int(ids[len(ids) // 2])
            assert torch.equal(out3[len(ids) // 2, layers - 1], kv[layers - 1][check]), (
                "gather produced wrong bytes"
            )

            row = {
                "device": "cpu",
                "page_bytes": page,
                "layers": layers,
                "blocks": blocks,
                "bytes": nbytes,
                "threads": ops.get_num_threads(),
                **timed,
                "torch_index_select_gbps": gbps(nbytes, t_torch),
                "per_page_loop_gbps": gbps(loop_bytes, t_loop),
            }
            row["gather_vs_torch"] = row["gather_gbps"] / row["torch_index_select_gbps"]
            row["scatter_vs_torch"] = row["scatter_gbps"] / row["torch_index_select_gbps"]
            row["gather_vs_loop"] = row["gather_gbps"] / row["per_page_loop_gbps"]
            rows.append(row)
            _print_row(row)
    return rows


# vLLM layouts measured at 16 KiB pages: bf16, head size 64 (C = 256 B), 4 KV heads, 16 tokens.
LAYOUT_ROWS = ("LBHNC", "LBNHC", "BLNHC", "LHBNC")
LAYOUT_BLOCK_SIZE, LAYOUT_KV_HEADS, LAYOUT_HEAD_SIZE = 16, 4, 64


def _layout_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from membrain import ops
    from membrain.bench.vllm_kv import vllm_kv_caches

    rng = np.random.default_rng(1)
    layers = 8
    page = 16 << 10
    blocks = max(1, ((32 << 20) if args.quick else TARGET_BYTES) // (page * layers))
    num_blocks = blocks * 2  # gather a random half, in random order, as the rows above
    rows = []
    for layout in LAYOUT_ROWS:
        raw, kv = vllm_kv_caches(
            layout, layers, num_blocks, LAYOUT_BLOCK_SIZE, LAYOUT_KV_HEADS, LAYOUT_HEAD_SIZE, torch.bfloat16
        )
        raw.view(torch.uint8).random_(0, 256)
        desc = ops.describe_kv_caches(kv, num_blocks)
        assert desc.page_bytes == page, desc
        ids = rng.permutation(num_blocks)[:blocks].astype(np.int64)
        nbytes = desc.packed_nbytes(blocks)
        out = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        timed = _copy_vs_limit(desc, ids, out, args.repeats)
        # Correctness guard against the logical view (see membrain.ops: page_order).
        ops.gather_blocks(desc, ids, out)
        i, l = len(ids) // 2, layers - 1
        logical = kv[l][int(ids[i])]
        if desc.page_order == "NHC":
            logical = logical.permute(1, 0, 2)
        got = out.view(blocks, layers, page)[i, l]
        assert torch.equal(got, logical.contiguous().reshape(-1).view(torch.uint8)), (
            "gather produced wrong bytes"
        )
        row: dict[str, Any] = {
            "device": "cpu",
            "layout": layout,
            "page_order": desc.page_order,
            "runs_per_block": 1 if desc.block_is_one_run else layers * desc.sub_count * desc.run_count,
            "page_bytes": page,
            "layers": layers,
            "blocks": blocks,
            "bytes": nbytes,
            "threads": ops.get_num_threads(),
            **timed,
        }
        rows.append(row)
        print(
            f"{layout:>6} {row['page_order']:>5} {row['runs_per_block']:>5} {page // 1024:>4}Ki {layers:>6} "
            f"{blocks:>7} {row['gather_gbps']:>8.2f} {row['scatter_gbps']:>8.2f} {row['limit_memcpy_gbps']:>8.2f} "
            f"{row['gather_vs_limit']:>6.2f} {row['scatter_vs_limit']:>6.2f}",
            flush=True,
        )
    return rows


def _print_header() -> None:
    print(
        f"{'page':>8} {'layers':>6} {'blocks':>7} {'gather':>8} {'scatter':>8} {'memcpy':>8} "
        f"{'torch':>7} {'loop':>7} {'g/lim':>6} {'s/lim':>6} {'g/torch':>8} {'s/torch':>8}   (GB/s)"
    )


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['page_bytes'] // 1024:>6}Ki {r['layers']:>6} {r['blocks']:>7} {r['gather_gbps']:>8.2f} "
        f"{r['scatter_gbps']:>8.2f} {r['limit_memcpy_gbps']:>8.2f} {r['torch_index_select_gbps']:>7.2f} "
        f"{r['per_page_loop_gbps']:>7.2f} {r['gather_vs_limit']:>6.2f} {r['scatter_vs_limit']:>6.2f} "
        f"{r['gather_vs_torch']:>8.1f} {r['scatter_vs_torch']:>8.1f}",
        flush=True,
    )


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Acceptance figures: medians over the 16 KiB CPU rows of raw pages, and each vLLM layout
    row (acceptance: LBNHC >= 0.8x, BLNHC >= 0.9x the limit)."""
    summary: dict[str, Any] = {}
    sixteen = [
        r for r in rows if r.get("device") == "cpu" and r["page_bytes"] == 16 << 10 and "layout" not in r
    ]
    if sixteen:
        med = lambda key: float(np.median([r[key] for r in sixteen]))  # noqa: E731
        summary.update(
            {
                "cpu_16KiB_gather_vs_limit": med("gather_vs_limit"),
                "cpu_16KiB_scatter_vs_limit": med("scatter_vs_limit"),
                "cpu_16KiB_gather_vs_torch": med("gather_vs_torch"),
                "cpu_16KiB_scatter_vs_torch": med("scatter_vs_torch"),
            }
        )
    # Each layout's ratios: the median over passes (--layout-passes), with their range.
    by_layout: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("device") == "cpu" and "layout" in r:
            by_layout.setdefault(r["layout"], []).append(r)
    for layout, rs in by_layout.items():
        for op in ("gather", "scatter"):
            vals = [r[f"{op}_vs_limit"] for r in rs]
            summary[f"cpu_16KiB_{layout}_{op}_vs_limit"] = float(np.median(vals))
            if len(vals) > 1:
                summary[f"cpu_16KiB_{layout}_{op}_vs_limit_range"] = [min(vals), max(vals)]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="membrain bench gather",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", metavar="PATH", help="write all rows and the machine description here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and smaller buffers")
    parser.add_argument("--threads", type=int, default=0, help="CPU copy threads (0 = default)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per measurement (median)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    parser.add_argument(
        "--layouts-only", action="store_true", help="of the CPU rows, only the vLLM layout rows"
    )
    parser.add_argument(
        "--layout-passes",
        type=int,
        default=1,
        help="measure the vLLM layout rows this many times; the summary takes each ratio's median",
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA rows")
    args = parser.parse_args(argv)

    from membrain import ops
    from membrain.bench.machine import machine_info

    ops.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"machine: {info['cpu_model']} ({info['cpu_cores']} cores)"
        + (f", GPU {info['gpu_name']}" if info.get("gpu_name") else "")
    )
    rows: list[dict[str, Any]] = []
    if not args.no_cpu:
        print(
            f"CPU gather/scatter, {ops.get_num_threads()} threads; limit = one contiguous memcpy, same threads"
        )
        if not args.layouts_only:
            _print_header()
            rows += _cpu_rows(args)
        try:
            import vllm  # noqa: F401

            have_vllm = True
        except ImportError:
            have_vllm = False
        if have_vllm:
            print(
                "\nvLLM layouts (views from create_kv_cache_views); limit = one contiguous memcpy, same run"
            )
            print(
                f"{'layout':>6} {'order':>5} {'runs':>5} {'page':>6} {'layers':>6} {'blocks':>7} {'gather':>8} "
                f"{'scatter':>8} {'memcpy':>8} {'g/lim':>6} {'s/lim':>6}   (GB/s; runs per block)"
            )
            for n in range(max(1, args.layout_passes)):
                rows += [dict(r, layout_pass=n) for r in _layout_rows(args)]
        else:
            print("vLLM layout rows skipped: vllm is not installed")
    cuda_rows: list[dict[str, Any]] = []
    if not args.no_cuda:
        try:
            import torch

            has_cuda = torch.cuda.is_available()
        except ImportError:
            has_cuda = False
        if has_cuda:
            from membrain.bench.gather_cuda import run_cuda_gather_bench

            cuda_rows = run_cuda_gather_bench(args)
        else:
            print("CUDA rows skipped: no CUDA device")
    summary = summarize(rows)
    if cuda_rows:
        from membrain.bench import gather_cuda

        summary.update(getattr(gather_cuda, "summarize", lambda r: {})(cuda_rows))
    for k, v in summary.items():
        print(f"{k}: " + (f"{v[0]:.2f}-{v[1]:.2f}" if isinstance(v, list) else f"{v:.2f}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"benchmark": "gather", "machine": info, "rows": rows + cuda_rows, "summary": summary},
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
