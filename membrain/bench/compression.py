"""Wire compression on real KV: ratio, compress / decompress GB/s, and the link bandwidth below
which it pays (``membrain bench compression``).

KV blocks come from (first match):

* ``--from-redis redis://h:p`` (``--namespace``): the blocks a Membrain remote tier stored in
  that Redis (SCAN ``mb:<namespace>:*``, trailers verified and stripped);
* ``--vllm`` (default): starts a local redis-server, runs one vLLM instance on the e2e test
  model (:func:`membrain.bench.common.ensure_model`, random-weight bf16 Llama) with Membrain's
  remote tier on it, then reads the blocks back as above;
* ``--synthetic``: bf16 values drawn from a normal distribution.

Break-even: a block of S raw bytes costs S/B on a link of B bytes/s uncompressed and
S/(r*B) + S/X compressed, where r is the ratio and X the (de)compress throughput of one codec
thread; compression pays when B < X * (1 - 1/r). That is the conservative, unpipelined figure:
with the codec overlapped with the transfer the bound rises to about X (per codec thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from membrain.tiers.codec import Codec


def blocks_from_redis(endpoint: str, namespace: str, limit: int) -> list[bytes]:
    import redis

    from membrain.tiers.redis_backend import verify

    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    r = redis.Redis(host=host, port=int(port), socket_timeout=10)
    out: list[bytes] = []
    for k in r.scan_iter(match=f"mb:{namespace}:*".encode(), count=256):
        v = r.get(k)
        p = verify(v) if isinstance(v, bytes) else None
        if p is not None:
            out.append(bytes(p))
        if len(out) >= limit:
            break
    r.close()
    return out


def blocks_from_vllm(workdir: Path, limit: int) -> list[bytes]:
    from membrain.bench import common as C
    from membrain.bench.redis_local import RedisNode

    model = C.ensure_model(Path(os.environ.get("MEMBRAIN_TEST_MODEL_DIR", workdir / "model")))
    node = RedisNode()
    try:
        spec = {
            "model": model,
            "prompts": C.make_prompts(4, 1500),
            "max_tokens": 4,
            "membrain": "explicit",
            "extra": {"endpoint": f"redis://{node.endpoint}", "namespace": "kv", "cpu_cache_size": 0},
            "kv_cache_memory_bytes": 64 << 20,
            "max_model_len": 2048,
        }
        run = C.run_instance(spec, C.base_env(), workdir, "compression_kv")
        if run["rc"] != 0:
            raise RuntimeError(f"vLLM run failed, see {run['log_path']}")
        time.sleep(1.0)
        return blocks_from_redis(f"redis://{node.endpoint}", "kv", limit)
    finally:
        node.close()


def synthetic_blocks(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        f = rng.normal(0, 1, size // 2).astype(np.float32)
        out.append((f.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return out


def measure(blocks: list[bytes], level: int, elem: int, repeat: int = 3) -> dict[str, float]:
    codec = Codec(level, elem)
    raw = sum(len(b) for b in blocks)
    enc = [codec.encode(b) for b in blocks]
    comp = sum(len(e) for e in enc)
    t_c, t_d = [], []
    bufs = [bytearray(len(b)) for b in blocks]
    for _ in range(repeat):
        t = time.perf_counter()
        for b in blocks:
            codec.encode(b)
        t_c.append(time.perf_counter() - t)
        t = time.perf_counter()
        for e, d in zip(enc, bufs):
            if not codec.decode_into(e, d):
                raise RuntimeError("decode failed")
        t_d.append(time.perf_counter() - t)
    if [bytes(b) for b in bufs] != blocks:
        raise RuntimeError("round trip differs")
    ratio = raw / comp
    c_gbps = raw / statistics.median(t_c) / 1e9
    d_gbps = raw / statistics.median(t_d) / 1e9
    keep = 1 - 1 / ratio
    return {
        "level": level,
        "elem_size": elem,
        "ratio": ratio,
        "compress_gbps": c_gbps,
        "decompress_gbps": d_gbps,
        # Link bandwidth (GB/s) below which compression saves time, one codec thread, unpipelined.
        "break_even_put_gbps": c_gbps * keep,
        "break_even_get_gbps": d_gbps * keep,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="membrain bench compression", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--from-redis", metavar="redis://H:P", help="blocks a remote tier stored in this Redis")
    src.add_argument("--vllm", action="store_true", help="run vLLM on the test model first (default)")
    src.add_argument("--synthetic", action="store_true", help="bf16 normal values instead of real KV")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--blocks", type=int, default=64, help="at most this many blocks")
    ap.add_argument("--levels", default="-1,1,3,9", help="zstd levels, comma-separated")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    if args.from_redis:
        blocks, source = blocks_from_redis(args.from_redis, args.namespace, args.blocks), args.from_redis
    elif args.synthetic:
        blocks, source = synthetic_blocks(args.blocks, 1 << 20), "synthetic bf16 N(0,1)"
    else:
        with tempfile.TemporaryDirectory(prefix="membrain-compression-") as d:
            blocks = blocks_from_vllm(Path(d), args.blocks)
        source = "vLLM KV of the e2e test model (random-weight bf16 Llama)"
    if not blocks:
        print("no KV blocks found", file=sys.stderr)
        return 1
    print(f"{len(blocks)} blocks of {len(blocks[0]) / 1024:.0f} KiB from {source}")
    rows = []
    for level in [int(x) for x in args.levels.split(",") if x.strip()]:
        for elem in (2, 1):
            r = measure(blocks, level, elem)
            rows.append(r)
            print(
                f"zstd:{level:<3} {'shuffle 2' if elem == 2 else 'no shuffle'}: ratio {r['ratio']:.3f}  "
                f"compress {r['compress_gbps']:.2f} GB/s  decompress {r['decompress_gbps']:.2f} GB/s  "
                f"(one thread); pays below {r['break_even_put_gbps']:.2f} GB/s (PUT) / "
                f"{r['break_even_get_gbps']:.2f} GB/s (GET) link bandwidth",
                flush=True,
            )
    res = {"source": source, "blocks": len(blocks), "block_bytes": len(blocks[0]), "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
