"""Redis / Valkey remote backend (membrain.tiers.redis_backend) against real redis-server
processes on loopback: a standalone server and a 3-master cluster."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("redis")

from membrain.bench.redis_local import RedisCluster, RedisNode, have_redis
from membrain.tiers.backend import RemoteBackend
from membrain.tiers.redis_backend import TRAILER, RedisBackend, pack
from membrain.tiers.remote import RemoteTier, make_client
from membrain.vllm import config as mcfg

needs_redis = pytest.mark.skipif(not have_redis(), reason="redis-server / redis-cli not installed")
BLOCK = 64 << 10


def _blocks(n: int, size: int = BLOCK) -> tuple[list[bytes], list[bytes]]:
    return [os.urandom(16) for _ in range(n)], [os.urandom(size) for _ in range(n)]


# ---------------------------------------------------------------------------- configuration


def test_parse_endpoints_redis_schemes() -> None:
    assert mcfg.parse_endpoints("redis://10.0.0.1:6379") == ["redis://10.0.0.1:6379"]
    assert mcfg.parse_endpoints("rediss://cache:6380") == ["rediss://cache:6380"]
    assert mcfg.parse_endpoints("redis-cluster://a:7000,b:7001, c:7002") == [
        "redis-cluster://a:7000",
        "redis-cluster://b:7001",
        "redis-cluster://c:7002",
    ]
    assert mcfg.parse_endpoints(["redis-cluster://a:7000", "redis-cluster://b:7001"]) == [
        "redis-cluster://a:7000",
        "redis-cluster://b:7001",
    ]
    for bad in (
        "redis://a:6379,tcp://b:9201",
        "tcp://b:9201,redis://a:6379",
        "redis://a:1,redis://b:2",
        "redis://a:1,rediss://b:2",
        "redis-cluster://a:1,redis://b:2",
        "redis://:secret@a:6379",
        "redis://a",
        "redis-cluster://a:1,b",
    ):
        with pytest.raises(mcfg.ConfigError):
            mcfg.parse_endpoints(bad)


def test_resolve_redis_from_env_and_extra(tmp_path: Path) -> None:
    s = mcfg.resolve({}, {"VLLM_MEMBRAIN_ENDPOINT": "redis-cluster://h1:1,h2:2"})
    assert s.endpoints == ["redis-cluster://h1:1", "redis-cluster://h2:2"]
    s = mcfg.resolve({"endpoint": "redis://h:6379"}, {"VLLM_MEMBRAIN_ENDPOINT": "tcp://x:1"})
    assert s.endpoints == ["redis://h:6379"]
    assert mcfg.resolve({"endpoint": s.to_extra_config()["endpoint"]}, {}).endpoints == s.endpoints
    with pytest.raises(mcfg.ConfigError, match="replicas"):
        mcfg.resolve({"endpoint": "redis-cluster://h1:1,h2:2", "replicas": 2}, {})


# ---------------------------------------------------------------------------- servers


@pytest.fixture
def cluster():
    if not have_redis():
        pytest.skip("redis-server / redis-cli not installed")
    c = RedisCluster(3)
    yield c
    c.close()


def _backend(endpoint: str, **kw) -> RedisBackend:
    return RedisBackend(mcfg.parse_endpoints(endpoint), **kw)


def _check_roundtrip(b: RedisBackend, n: int = 24) -> tuple[list[bytes], list[bytes]]:
    keys, vals = _blocks(n)
    assert b.put_async(keys, vals).result(timeout=10) == [True] * n
    assert b.lookup_prefix(keys) == n
    assert b.lookup_prefix([*keys[:2], os.urandom(16), *keys[2:]]) == 2
    bufs = [bytearray(BLOCK) for _ in keys]
    assert b.get_into(keys, bufs) == [True] * n
    assert [bytes(x) for x in bufs] == vals
    return keys, vals


@needs_redis
def test_standalone_roundtrip_byte_exact(standalone: RedisNode) -> None:
    b = _backend(f"redis://{standalone.endpoint}")
    assert isinstance(b, RemoteBackend)
    try:
        keys, vals = _check_roundtrip(b)
        # Numpy / memoryview buffers (HostPool slots are buffer-protocol objects too).
        np = pytest.importorskip("numpy")
        arr = np.zeros((2, BLOCK // 2), dtype=np.uint8)
        assert b.get_into(keys[:1], [arr]) == [True]
        assert arr.tobytes() == vals[0]
        # HostPool slots (what the worker passes), both ways.
        import membrain

        pool = membrain.HostPool(BLOCK, 4, pin=False, huge_pages=False)
        slots = pool.acquire_many(4)
        assert slots is not None
        assert b.get_into(keys[:4], slots) == [True] * 4
        assert [bytes(memoryview(s)) for s in slots] == vals[:4]
        assert b.put_async([b"from-slot"], [slots[1]]).result(timeout=10) == [True]
        out = bytearray(BLOCK)
        assert b.get_into([b"from-slot"], [out]) == [True] and bytes(out) == vals[1]
        # A buffer of the wrong size is a miss and stays untouched.
        small = bytearray(BLOCK - 1)
        assert b.get_into(keys[:1], [small]) == [False]
        assert small == bytearray(BLOCK - 1)
    finally:
        b.close()


@needs_redis
def test_namespace_is_a_key_prefix(standalone: RedisNode) -> None:
    a = _backend(f"redis://{standalone.endpoint}", namespace="a")
    z = _backend(f"redis://{standalone.endpoint}", namespace="z")
    try:
        keys, vals = _blocks(3)
        assert all(a.put_async(keys, vals).result(timeout=10))
        assert z.lookup_prefix(keys) == 0
        assert a.lookup_prefix(keys) == 3
        import redis

        r = redis.Redis(host="127.0.0.1", port=standalone.port)
        assert r.get(b"mb:a:" + keys[0]) == pack(vals[0])
        assert len(pack(vals[0])) == BLOCK + TRAILER
        r.close()
    finally:
        a.close()
        z.close()


@needs_redis
def test_corrupt_or_truncated_value_is_a_miss(standalone: RedisNode) -> None:
    import redis

    b = _backend(f"redis://{standalone.endpoint}")
    r = redis.Redis(host="127.0.0.1", port=standalone.port)
    try:
        keys, vals = _blocks(4)
        assert all(b.put_async(keys, vals).result(timeout=10))
        k = [b"mb:default:" + x for x in keys]
        flipped = bytearray(r.get(k[0]))
        flipped[100] ^= 0x01
        r.set(k[0], bytes(flipped))  # one bit flipped in the payload
        r.set(k[1], r.get(k[1])[: BLOCK // 2])  # truncated
        r.set(k[2], vals[2])  # a foreign value without trailer
        bufs = [bytearray(BLOCK) for _ in keys]
        assert b.get_into(keys, bufs) == [False, False, False, True]
        # Values of another length are skipped unread; a flipped bit is only found once the
        # value has landed, so that buffer's bytes are undefined (as with membrain.Client).
        assert bufs[1] == bytearray(BLOCK) and bufs[2] == bytearray(BLOCK)
        assert bytes(bufs[3]) == vals[3]
        # Nothing was left unread: the same connection serves the next batch.
        assert b.get_into(keys[3:], bufs[3:]) == [True]
    finally:
        r.close()
        b.close()


@needs_redis
def test_auth_token_file_is_the_redis_password(tmp_path: Path) -> None:
    node = RedisNode(password="s3cret-token")
    try:
        tok = tmp_path / "token"
        tok.write_text("s3cret-token\n")
        s = mcfg.resolve({"endpoint": f"redis://{node.endpoint}", "auth_token_file": str(tok)}, {})
        b = make_client(s)
        assert isinstance(b, RedisBackend)
        _check_roundtrip(b, 4)
        b.close()
        # Wrong password: every call fails -> the tier reports misses, never raises.
        tok.write_text("wrong")
        bad = make_client(
            mcfg.resolve({"endpoint": f"redis://{node.endpoint}", "auth_token_file": str(tok)}, {})
        )
        tier = RemoteTier(bad, timeout_ms=500)
        assert tier.lookup_prefix([b"k" * 16]) == 0
        assert tier.get_into([b"k" * 16], [bytearray(8)]) == [False]
        assert not tier.available  # breaker open
        tier.close()
    finally:
        node.close()


@needs_redis
def test_standalone_down_and_hung_are_misses_within_deadline(standalone: RedisNode) -> None:
    b = _backend(f"redis://{standalone.endpoint}", timeout_ms=300)
    tier = RemoteTier(b, timeout_ms=300, backoff_s=0.2, max_backoff_s=0.4)
    try:
        keys, vals = _blocks(8)
        assert all(b.put_async(keys, vals).result(timeout=10))
        # Hung server (SIGSTOP): the call ends within about the deadline, all misses.
        os.kill(standalone.pid, signal.SIGSTOP)
        try:
            t = time.monotonic()
            assert tier.get_into(keys, [bytearray(BLOCK) for _ in keys]) == [False] * 8
            assert time.monotonic() - t < 1.5
            assert not tier.available  # the tier's breaker opened
            t = time.monotonic()
            assert tier.lookup_prefix(keys) == 0  # skipped while open: instant
            assert time.monotonic() - t < 0.05
        finally:
            os.kill(standalone.pid, signal.SIGCONT)
        # Recovers after the backoff.
        deadline = time.monotonic() + 10
        while tier.lookup_prefix(keys) != 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tier.lookup_prefix(keys) == 8
        # Killed server: misses, no exception, breaker opens.
        standalone.kill()
        assert tier.get_into(keys, [bytearray(BLOCK) for _ in keys]) == [False] * 8
        assert not tier.available
        done: list[list[bool]] = []
        tier.put_async(keys, vals, done.append)  # dropped while open: no call, no exception
    finally:
        tier.close()


@needs_redis
def test_cluster_roundtrip_and_pipelined_per_node(cluster: RedisCluster) -> None:
    b = _backend(cluster.endpoint)
    try:
        keys, _ = _check_roundtrip(b, 48)
        groups = b._groups([b.prefix + k for k in keys])
        assert len(groups) == 3  # one pipelined round trip per master
        assert sorted(i for _, _, idx in groups for i in idx) == list(range(48))
        # Keys really are spread over the masters.
        sizes = [int(n.cli("dbsize").strip()) for n in cluster.nodes]
        assert sum(sizes) == 48 and min(sizes) > 0
    finally:
        b.close()


@needs_redis
def test_cluster_master_killed_mid_run(cluster: RedisCluster) -> None:
    b = _backend(cluster.endpoint, timeout_ms=500)
    tier = RemoteTier(b, timeout_ms=500, backoff_s=0.2, max_backoff_s=0.5)
    try:
        keys, vals = _blocks(48)
        assert all(b.put_async(keys, vals).result(timeout=10))
        victim = cluster.nodes[1]
        on_victim = {
            i
            for name, _, idx in b._groups([b.prefix + k for k in keys])
            for i in idx
            if name.endswith(f":{victim.port}")
        }
        assert on_victim
        victim.kill()
        seen_partial = False
        t_end = time.monotonic() + 4.0  # past cluster-node-timeout (1 s): CLUSTERDOWN too
        while time.monotonic() < t_end:
            bufs = [bytearray(BLOCK) for _ in keys]
            t = time.monotonic()
            hits = tier.get_into(keys, bufs)  # never raises
            assert time.monotonic() - t < 2.0
            for i, ok in enumerate(hits):
                if ok:
                    assert bytes(bufs[i]) == vals[i]  # never wrong bytes
                    assert i not in on_victim
            if any(hits) and not all(hits):
                seen_partial = True
            assert 0 <= tier.lookup_prefix(keys) <= len(keys)
            res: list[list[bool]] = []
            tier.put_async(keys[:4], vals[:4], res.append)
            time.sleep(0.1)
        assert seen_partial  # the survivors' keys stayed hits for a while
        # The dead node's own breaker skips it: no connection attempt per call.
        assert any(br.is_open for br in b._breakers.values())
        # Everything down: the tier's breaker opens, calls are instant misses.
        for n in cluster.nodes:
            n.kill()
        for _ in range(3):
            assert tier.get_into(keys, [bytearray(BLOCK) for _ in keys]) == [False] * len(keys)
        assert not tier.available
        assert tier.drain(5.0)
    finally:
        tier.close()


@needs_redis
def test_cluster_hung_master_within_deadline(cluster: RedisCluster) -> None:
    """A master that stops answering (SIGSTOP): its keys are misses within about the deadline,
    the other masters' keys still hit, byte-exact; then its breaker skips it (fast calls)."""
    b = _backend(cluster.endpoint, timeout_ms=400, breaker_base_s=2.0)
    try:
        keys, vals = _blocks(48)
        assert all(b.put_async(keys, vals).result(timeout=10))
        victim = cluster.nodes[0]
        groups = b._groups([b.prefix + k for k in keys])
        on_victim = {i for name, _, idx in groups for i in idx if name.endswith(f":{victim.port}")}
        assert on_victim
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            for attempt in range(3):
                bufs = [bytearray(BLOCK) for _ in keys]
                t = time.monotonic()
                hits = b.get_into(keys, bufs)
                took = time.monotonic() - t
                assert took < 1.2, took  # 400 ms deadline (+ scheduling slack on 2 cores)
                assert not any(hits[i] for i in on_victim)
                assert all(hits[i] for i in range(len(keys)) if i not in on_victim)
                assert all(bytes(bufs[i]) == vals[i] for i in range(len(keys)) if hits[i])
                if attempt:
                    assert took < 0.3  # the hung node is skipped by its breaker
                else:
                    # The call returns at its deadline; the hung node's own read times out at
                    # about the same moment and only then opens its breaker: wait for that.
                    victim_name = next(name for name, _, _ in groups if name.endswith(f":{victim.port}"))
                    deadline = time.monotonic() + 2.0
                    while b._breaker(victim_name).allows_attempt() and time.monotonic() < deadline:
                        time.sleep(0.02)
                    assert not b._breaker(victim_name).allows_attempt()
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    finally:
        b.close()


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    import subprocess

    ca_key, ca, key, csr, crt, ext = (d / n for n in ("ca.key", "ca.crt", "s.key", "s.csr", "s.crt", "ext"))
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=membrain-test-ca")  # fmt: skip
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, crt, key


@needs_redis
@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_rediss_tls_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rediss:// verifies the server against the system CAs (here SSL_CERT_FILE points at a
    test CA): a round trip works; without trusting the CA every call is a miss."""
    from membrain.bench.redis_local import free_port

    ca, crt, key = _tls_files(tmp_path)
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(crt), "--tls-key-file", str(key),
           "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]  # fmt: skip
    try:
        node = RedisNode(extra=tls)
    except RuntimeError:
        pytest.skip("redis-server without TLS support")
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        b = _backend(f"rediss://127.0.0.1:{tls_port}")
        _check_roundtrip(b, 4)
        b.close()
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted = RemoteTier(_backend(f"rediss://127.0.0.1:{tls_port}", timeout_ms=500))
        assert untrusted.lookup_prefix([b"k" * 16]) == 0 and not untrusted.available
        untrusted.close()
    finally:
        node.close()


def test_cluster_unreachable_at_start_is_not_fatal() -> None:
    """vLLM may start before its Redis: the backend is created anyway (connected on first use),
    calls are misses and open the tier's breaker, and nothing raises."""
    from membrain.bench.redis_local import free_port

    s = mcfg.resolve({"endpoint": f"redis-cluster://127.0.0.1:{free_port(True)}", "timeout_ms": 300}, {})
    b = make_client(s)
    assert isinstance(b, RedisBackend)
    tier = RemoteTier(b, timeout_ms=300)
    assert tier.lookup_prefix([b"k" * 16]) == 0
    assert tier.get_into([b"k" * 16], [bytearray(8)]) == [False]
    assert not tier.available
    tier.close()
