"""Gather/scatter bandwidth: Membrain's ops beside torch and the physical limit, same run.

For each page size and (layers, blocks) shape, on CPU tensors:
  * membrain gather and scatter (multi-threaded C++),
  * torch index_select + copy (what a Python connector would write),
  * a per-page copy loop (torch copy_ per page),
  * the limit: one contiguous copy of the same bytes by the same number of threads (the
    faster of glibc memcpy and a streaming-store copy).
With a CUDA device, the GPU rows come from membrain.bench.gather_cuda.

Usage: membrain bench gather [--quick] [--json PATH] [--threads N]
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


def _cpu_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from membrain import _native, ops
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
            src = out.clone()
            limit_dst = torch.empty_like(out)
            desc = ops.describe_kv_caches(kv)
            out3 = out.view(blocks, layers, page)

            t_gather = median_seconds(lambda: ops.gather_blocks(desc, ids, out), repeats=args.repeats)
            t_scatter = median_seconds(lambda: ops.scatter_blocks(src, desc, ids), repeats=args.repeats)
            # The limit is the faster of glibc's memcpy and a streaming-store copy, both split
            # over the same threads: one contiguous copy of the same bytes.
            t_limit = min(
                median_seconds(
                    lambda: _native.memcpy_cpu(limit_dst.data_ptr(), src.data_ptr(), nbytes),
                    repeats=args.repeats,
                ),
                median_seconds(
                    lambda: _native.memcpy_cpu(limit_dst.data_ptr(), src.data_ptr(), nbytes, True),
                    repeats=args.repeats,
                ),
            )

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

            g_limit = gbps(nbytes, t_limit)
            row = {
                "device": "cpu",
                "page_bytes": page,
                "layers": layers,
                "blocks": blocks,
                "bytes": nbytes,
                "threads": ops.get_num_threads(),
                "gather_gbps": gbps(nbytes, t_gather),
                "scatter_gbps": gbps(nbytes, t_scatter),
                "limit_memcpy_gbps": g_limit,
                "torch_index_select_gbps": gbps(nbytes, t_torch),
                "per_page_loop_gbps": gbps(loop_bytes, t_loop),
            }
            row["gather_vs_limit"] = row["gather_gbps"] / g_limit
            row["scatter_vs_limit"] = row["scatter_gbps"] / g_limit
            row["gather_vs_torch"] = row["gather_gbps"] / row["torch_index_select_gbps"]
            row["scatter_vs_torch"] = row["scatter_gbps"] / row["torch_index_select_gbps"]
            row["gather_vs_loop"] = row["gather_gbps"] / row["per_page_loop_gbps"]
            rows.append(row)
            _print_row(row)
            del kv, out, src, limit_dst
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
    """Acceptance figures: medians over the 16 KiB CPU rows."""
    sixteen = [r for r in rows if r.get("device") == "cpu" and r["page_bytes"] == 16 << 10]
    if not sixteen:
        return {}
    med = lambda key: float(np.median([r[key] for r in sixteen]))  # noqa: E731
    return {
        "cpu_16KiB_gather_vs_limit": med("gather_vs_limit"),
        "cpu_16KiB_scatter_vs_limit": med("scatter_vs_limit"),
        "cpu_16KiB_gather_vs_torch": med("gather_vs_torch"),
        "cpu_16KiB_scatter_vs_torch": med("scatter_vs_torch"),
    }


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
        _print_header()
        rows += _cpu_rows(args)
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
        print(f"{k}: {v:.2f}")
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
