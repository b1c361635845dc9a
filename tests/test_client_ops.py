"""Round trips of every operation against a real server subprocess."""

from __future__ import annotations

import os
import random
import threading
import time

import numpy as np
import pytest

import membrain
from membrain import _native


def _val(i: int, n: int) -> bytes:
    return random.Random(i).randbytes(n)


def test_native_connection_round_trip(server) -> None:
    c = _native.Connection("127.0.0.1", server.port, timeout_ms=2000)
    assert c.limits["max_batch"] >= 1
    keys = [f"nk{i}".encode() for i in range(10)]
    vals = [_val(i, 1000 + i) for i in range(10)]
    assert c.put(keys, vals) == [_native.STATUS_OK] * 10
    assert c.get(keys + [b"absent"]) == vals + [None]
    bufs = [bytearray(len(v)) for v in vals] + [bytearray(4)]
    assert c.get_into(keys + [b"absent"], bufs) == [0] * 10 + [_native.STATUS_NOT_FOUND]
    assert [bytes(b) for b in bufs[:10]] == vals
    small = [bytearray(10)]
    assert c.get_into(keys[:1], small) == [_native.STATUS_TOO_LARGE]
    assert small[0] == bytearray(10)  # untouched, and the stream stays in sync:
    assert c.get(keys[1:2]) == vals[1:2]
    assert c.exists([keys[0], b"zz"]) == [0, _native.STATUS_NOT_FOUND]
    assert c.lookup_prefix(keys[:3] + [b"zz"] + keys[3:]) == 3
    assert c.delete([keys[0], b"zz"]) == 1
    assert c.ping() > 0
    assert "items" in c.stats()
    assert not c.broken


def test_native_connection_validation(server) -> None:
    c = _native.Connection("127.0.0.1", server.port)
    with pytest.raises(ValueError, match="keys"):
        c.put([b"a", b"b"], [b"x"])
    with pytest.raises(ValueError, match="bytes"):
        c.get([b""])
    with pytest.raises(ValueError, match="bytes"):
        c.get([b"x" * 129])
    with pytest.raises(TypeError):
        c.put([b"a"], [12])
    with pytest.raises(ValueError, match="writable"):
        c.get_into([b"a"], [b"readonly"])
    with pytest.raises(ValueError, match="contiguous"):
        c.put([b"a"], [np.zeros((4, 4), np.uint8)[:, 1]])
    with pytest.raises(ValueError, match="namespace"):
        _native.Connection("127.0.0.1", server.port, namespace="no spaces")
    assert not c.broken


def test_client_all_ops(server) -> None:
    with membrain.Client(server.endpoint, timeout_ms=2000) as c:
        keys = [f"k{i}" for i in range(40)]
        vals = [_val(i, 4096) for i in range(40)]
        assert c.put(keys, vals) == [True] * 40
        assert c.get(keys) == vals
        assert c.get([b"missing"]) == [None]
        assert c.exists(keys[:2] + ["nope"]) == [True, True, False]
        assert c.lookup_prefix(keys) == 40
        assert c.lookup_prefix(keys[:5] + ["nope"] + keys[5:]) == 5
        assert c.lookup_prefix([]) == 0
        st = c.stats()
        for f in ("used_bytes", "capacity_bytes", "items", "hits", "misses", "evictions"):
            assert f in st
        assert st["items"] >= 40
        assert all(v is not None for v in c.ping().values())
        assert c.delete(keys[:10]) == 10
        assert c.get(keys[:10]) == [None] * 10
        # Async variants overlap with the caller.
        f1 = c.put_async(["a1", "a2"], [b"x" * 10, b"y" * 20])
        assert f1.result() == [True, True]
        assert c.get_async(["a1", "a2"]).result() == [b"x" * 10, b"y" * 20]
        assert c.exists_async(["a1"]).result() == [True]
        assert c.lookup_prefix_async(["a1", "a2", "a3"]).result() == 2
        buf = bytearray(20)
        assert c.get_into_async(["a2"], [buf]).result() == [True]
        assert bytes(buf) == b"y" * 20
        assert c.delete_async(["a1", "a2"]).result() == 2


def test_get_into_hostpool_and_numpy(server) -> None:
    pool = membrain.HostPool(64 << 10, 8, pin=False, huge_pages=False)
    slots = pool.acquire_many(4)
    data = [np.random.default_rng(i).integers(0, 256, 64 << 10, dtype=np.uint8) for i in range(4)]
    with membrain.Client(server.endpoint) as c:
        assert c.put([f"hp{i}" for i in range(4)], data) == [True] * 4
        assert c.get_into([f"hp{i}" for i in range(4)], slots) == [True] * 4
        for s, d in zip(slots, data):
            assert np.array_equal(np.frombuffer(s, dtype=np.uint8), d)
        arrs = [np.zeros(16 << 10, dtype=np.float32) for _ in range(4)]  # 64 KiB each
        assert c.get_into([f"hp{i}" for i in range(4)], arrs) == [True] * 4
        assert arrs[2].tobytes() == data[2].tobytes()
        # Put straight from a slot too.
        assert c.put(["fromslot"], [slots[0]]) == [True]
        assert c.get(["fromslot"]) == [data[0].tobytes()]
        # A too-small buffer is a miss, not a crash; bad arguments raise.
        assert c.get_into(["hp0"], [bytearray(10)]) == [False]
        with pytest.raises(ValueError):
            c.get_into(["hp0", "hp1"], [bytearray(10)])
        with pytest.raises(ValueError):
            c.get_into(["hp0"], [b"immutable"])
        with pytest.raises(TypeError):
            c.put(["x"], [object()])
        with pytest.raises(TypeError):
            c.get(b"not-a-list")
        with pytest.raises(ValueError):
            c.get(["k" * 129])
    for s in slots:
        s.release()


def test_large_batches_are_split(server) -> None:
    with membrain.Client(server.endpoint, timeout_ms=10000) as c:
        n = 2500  # above the default max_batch of 1024
        keys = [f"big{i}" for i in range(n)]
        vals = [i.to_bytes(4, "little") * 4 for i in range(n)]
        assert all(c.put(keys, vals))
        assert c.get(keys) == vals
        assert c.lookup_prefix(keys) == n
        assert c.delete(keys) == n


def test_put_is_pipelined_in_frames_of_about_a_mebibyte() -> None:
    from fake_server import FakeServer

    ops: list[int] = []
    # The server answers the first PUT frame only once the next request is in: a client that
    # waited for each reply before sending the next frame would time out here.
    srv = FakeServer(on_request=ops.append, hold_first_put_reply=True)
    try:
        conn = _native.Connection("127.0.0.1", srv.port, timeout_ms=5000)
        kib = 1024
        sizes = [256 * kib] * 8 + [3 * 1024 * kib] + [10] * 100
        keys = [f"f{i}".encode() for i in range(len(sizes))]
        vals = [_val(i, n) for i, n in enumerate(sizes)]
        ops.clear()
        assert conn.put(keys, vals) == [0] * len(keys)
        # Frames close once they carry 1 MiB of values: 4 + 4 quarter-MiB values, then the
        # 3 MiB one on its own, then the small tail together.
        assert ops.count(2) == 4
        assert conn.get(keys) == vals
    finally:
        srv.close()


def test_item_statuses_map_to_their_keys_across_many_frames() -> None:
    # 40 frames of one 1 MiB value each (more than the 32 the client keeps in flight), with the
    # server refusing every third key: each status must land on its own key.
    from fake_server import FakeServer

    refused = _native.STATUS_NO_SPACE
    srv = FakeServer(put_status=lambda k: refused if int(k[1:]) % 3 == 0 else 0)
    try:
        conn = _native.Connection("127.0.0.1", srv.port, timeout_ms=20000)
        keys = [f"s{i}".encode() for i in range(40)]
        vals = [_val(i, 1 << 20) for i in range(40)]
        expected = [refused if i % 3 == 0 else 0 for i in range(40)]
        assert conn.put(keys, vals) == expected
        assert conn.exists(keys) == [_native.STATUS_NOT_FOUND if i % 3 == 0 else 0 for i in range(40)]
    finally:
        srv.close()


def test_many_pipelined_put_frames_land_byte_exact(server) -> None:
    # More 1 MiB frames than the client keeps in flight, so replies are collected mid-batch.
    conn = _native.Connection("127.0.0.1", server.port, timeout_ms=20000)
    n = 40
    data = np.random.default_rng(7).integers(0, 256, n << 20, dtype=np.uint8)
    vals = [memoryview(data)[i << 20 : (i + 1) << 20] for i in range(n)]
    keys = [f"pipe{i}".encode() for i in range(n)]
    oversized = b"x" * (conn.limits["max_value_bytes"] + 1)
    statuses = conn.put(keys[:20] + [b"too-big"] + keys[20:], vals[:20] + [oversized] + vals[20:])
    assert statuses == [0] * 20 + [_native.STATUS_TOO_LARGE] + [0] * 20
    out = np.zeros_like(data)
    bufs = [memoryview(out)[i << 20 : (i + 1) << 20] for i in range(n)]
    assert conn.get_into(keys, bufs) == [0] * n
    assert np.array_equal(out, data)


def test_many_threads_mixed_ops(server) -> None:
    errors: list[str] = []
    with membrain.Client(server.endpoint, timeout_ms=5000) as c:

        def worker(t: int) -> None:
            rng = random.Random(t)
            for it in range(60):
                keys = [f"t{t}-{it}-{j}" for j in range(rng.randint(1, 8))]
                vals = [os.urandom(rng.choice([1, 100, 4096, 70000])) for _ in keys]
                if not all(c.put(keys, vals)):
                    errors.append(f"put failed {keys}")
                got = c.get(keys)
                if got != vals:
                    errors.append(f"get mismatch {keys}")
                bufs = [bytearray(len(v)) for v in vals]
                if not all(c.get_into(keys, bufs)) or [bytes(b) for b in bufs] != vals:
                    errors.append(f"get_into mismatch {keys}")
                if c.lookup_prefix(keys) != len(keys):
                    errors.append("lookup_prefix")
                if it % 3 == 0 and c.delete(keys[:1]) != 1:
                    errors.append("delete")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[:5]
        assert time.monotonic() - t0 < 60


def test_namespaces_and_auth(server_factory, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    srv = server_factory(extra_args=["--auth-token-file", str(token)])
    with (
        membrain.Client(srv.endpoint, auth_token="s3cret", namespace="a") as a,
        membrain.Client(srv.endpoint, auth_token="s3cret", namespace="b") as b,
    ):
        assert a.put(["k"], [b"from-a"]) == [True]
        assert b.get(["k"]) == [None]  # namespaces never collide
        assert a.get(["k"]) == [b"from-a"]
    with membrain.Client(srv.endpoint, auth_token="wrong", timeout_ms=500) as bad:
        assert bad.get(["k"]) == [None]  # refused HELLO: a miss, not an exception
        assert bad.put(["k"], [b"x"]) == [False]
    with pytest.raises(ConnectionError, match="UNAUTHORIZED"):
        _native.Connection("127.0.0.1", srv.port, auth_token="wrong")
