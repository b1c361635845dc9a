"""Wire compression of remote values (membrain.tiers.codec) and the remote tier using it with
both backends (a Membrain server and a standalone redis-server)."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("zstandard")

from membrain.bench.redis_local import RedisNode, have_redis
from membrain.client import Client
from membrain.tiers.codec import (
    HEADER,
    KIND_RAW,
    KIND_ZSTD,
    Codec,
    parse_compression,
    shuffle,
    unshuffle_into,
)
from membrain.tiers.redis_backend import RedisBackend
from membrain.tiers.remote import RemoteTier, make_codec
from membrain.vllm import config as mcfg

BLOCK = 128 * 1024


def _kv_like(n: int = BLOCK, seed: int = 0) -> bytes:
    """bf16 values of a normal distribution: compressible exponents, noisy mantissas."""
    f = np.random.default_rng(seed).normal(0, 1, n // 2).astype(np.float32)
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def test_parse_and_settings() -> None:
    assert parse_compression("") is None and parse_compression("off") is None
    assert parse_compression("zstd") == ("zstd", 1)
    assert parse_compression("ZSTD:9") == ("zstd", 9)
    assert parse_compression("zstd:-3") == ("zstd", -3)
    for bad in ("lz4", "zstd:x", "zstd:23", "zstd:0"):
        with pytest.raises(ValueError):
            parse_compression(bad)
    assert mcfg.resolve({}, {}).compression == ""
    s = mcfg.resolve({}, {"VLLM_MEMBRAIN_COMPRESSION": "zstd:5"})
    assert s.compression == "zstd:5" and s.to_extra_config()["compression"] == "zstd:5"
    assert mcfg.resolve({"compression": "zstd"}, {}).compression == "zstd"
    with pytest.raises(mcfg.ConfigError):
        mcfg.resolve({"compression": "gzip"}, {})
    c = make_codec(s, 2)
    assert c is not None and c.level == 5 and c.elem_size == 2
    assert make_codec(mcfg.resolve({}, {})) is None


def test_shuffle_roundtrip() -> None:
    raw = os.urandom(4096)
    planes = shuffle(memoryview(raw), 2)
    assert planes.tobytes() == raw[0::2] + raw[1::2]
    out = bytearray(4096)
    unshuffle_into(planes, memoryview(out), 2)
    assert bytes(out) == raw


def test_codec_roundtrip_raw_fallback_and_damage() -> None:
    c = Codec(3, 2)
    kv = _kv_like()
    enc = c.encode(kv)
    assert HEADER.unpack(enc[: HEADER.size])[1] == KIND_ZSTD and len(enc) < 0.95 * len(kv)
    buf = bytearray(len(kv))
    assert c.decode_into(enc, buf) and bytes(buf) == kv
    noise = os.urandom(BLOCK)  # does not shrink: stored raw, header only
    enc2 = c.encode(noise)
    assert HEADER.unpack(enc2[: HEADER.size])[1] == KIND_RAW and len(enc2) == BLOCK + HEADER.size
    assert c.decode_into(enc2, buf) and bytes(buf) == noise
    assert not c.decode_into(enc, bytearray(len(kv) - 2))  # wrong size buffer
    assert not c.decode_into(enc[:-10], buf)  # truncated
    bad = bytearray(enc)
    bad[HEADER.size + 20] ^= 0xFF
    ok = c.decode_into(bytes(bad), buf)
    assert not ok or bytes(buf) != kv  # zstd may not notice; the backends' checksums do
    assert not c.decode_into(b"junk" * 10, buf)
    assert not c.decode_into(kv, buf)  # an uncompressed value from a tier without codec


def _tier_roundtrip(tier: RemoteTier, n: int = 8) -> None:
    keys = [os.urandom(16) for _ in range(n)]
    vals = [_kv_like(seed=i) for i in range(n)]
    done: list[list[bool]] = []
    assert tier.put_async(keys, vals, done.append)
    assert tier.drain(10.0) and done == [[True] * n]
    assert tier.lookup_prefix(keys) == n
    bufs = [bytearray(BLOCK) for _ in keys]
    assert tier.get_into(keys, bufs) == [True] * n
    assert [bytes(b) for b in bufs] == vals


@pytest.mark.skipif(not have_redis(), reason="redis-server / redis-cli not installed")
def test_tier_compression_over_redis() -> None:
    node = RedisNode()
    try:
        tier = RemoteTier(RedisBackend([f"redis://{node.endpoint}"]), codec=Codec(3, 2))
        _tier_roundtrip(tier)
        import redis

        r = redis.Redis(host="127.0.0.1", port=node.port)
        # What is stored (and checksummed) is the compressed value.
        sizes = [r.strlen(k) for k in r.keys("mb:*")]
        assert len(sizes) == 8 and max(sizes) < 0.95 * BLOCK
        # A corrupt stored value is a miss (the backend's XXH3 trailer).
        k = r.keys("mb:*")[0]
        v = bytearray(r.get(k))
        v[40] ^= 1
        r.set(k, bytes(v))
        key = k[len(b"mb:default:") :]
        assert tier.get_into([key], [bytearray(BLOCK)]) == [False]
        r.close()
        tier.close()
    finally:
        node.close()


def test_tier_compression_over_membrain(server) -> None:
    tier = RemoteTier(Client(server.endpoint, timeout_ms=2000), codec=Codec(3, 2))
    try:
        _tier_roundtrip(tier)
        # A value stored without the codec is a miss for a codec tier, not garbage.
        plain = Client(server.endpoint, timeout_ms=2000)
        key = os.urandom(16)
        assert plain.put([key], [_kv_like()]) == [True]
        assert tier.get_into([key], [bytearray(BLOCK)]) == [False]
        plain.close()
    finally:
        tier.close()


def test_bench_compression_synthetic(tmp_path, capsys) -> None:
    import json

    from membrain.bench.compression import main

    out = tmp_path / "c.json"
    assert main(["--synthetic", "--blocks", "2", "--levels", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    rows = {r["elem_size"]: r for r in d["results"]}
    assert rows[2]["ratio"] > rows[1]["ratio"] > 1.0  # the shuffle helps on bf16
    assert rows[2]["break_even_get_gbps"] > 0 and rows[2]["decompress_gbps"] > 0
    assert "pays below" in capsys.readouterr().out
