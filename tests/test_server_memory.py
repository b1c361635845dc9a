"""What the server holds in memory stays within --capacity plus a fixed overhead, whatever the
clients do: many tiny or empty values, PUTs that declare values and never send them."""

from __future__ import annotations

import pytest
from wire import OK, WireClient

from membrain.server import spawn_server

MiB = 1 << 20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("sizes", [(0,), (0, 1, 17, 100)])
def test_tiny_and_empty_values_stay_within_capacity(sizes):
    # Capacity counted value bytes only: 600,000 empty values into a 1 MiB server grew its RSS
    # from 17 to 343 MiB (index entries and keys were free). Every object is now charged its
    # bookkeeping, so the index is evicted like values are.
    srv = spawn_server(capacity="1MiB", extra_args=["--no-prefault", "--log-level", "WARNING"])
    try:
        with WireClient(srv.port) as c:
            c.ping(b"warm")
            base = rss_mib(srv.pid)
            n, batch = 600_000, 1024
            for start in range(0, n, batch):
                items = [
                    (b"key-%08d" % i, b"v" * sizes[i % len(sizes)])
                    for i in range(start, min(n, start + batch))
                ]
                assert c.put(items) == [OK] * len(items)
            grown = rss_mib(srv.pid) - base
            st = c.stats()
            # Bound: capacity (1 MiB) plus allocator slack; 8 MiB leaves room for malloc's
            # own arenas and the interpreter, far below the ~326 MiB this used to take.
            assert grown < 8, f"RSS grew by {grown:.1f} MiB for {st['items']} items"
            assert st["evictions"] > 0 and 0 < st["items"] < 10_000
            assert st["meta_bytes"] <= st["meta_slab_bytes"] <= st["capacity_bytes"]
            assert st["allocated_bytes"] <= st["capacity_bytes"]
            # The newest items are there; the server still serves.
            last = [b"key-%08d" % i for i in range(n - 10, n)]
            assert all(v is not None for v in c.get(last))
    finally:
        assert srv.stop() == 0
