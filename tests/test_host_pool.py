"""Host block pool: zero-copy slots, refcounts, exhaustion as a value, reuse."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

import membrain


def test_slots_are_zero_copy_and_distinct():
    pool = membrain.HostPool(slot_bytes=10_000, num_slots=3)
    a, b = pool.acquire(), pool.acquire()
    assert a.nbytes == 10_000 and a.index != b.index
    np.frombuffer(a, dtype=np.uint8)[:] = 1
    t = torch.frombuffer(b, dtype=torch.uint8)
    t.fill_(2)
    assert memoryview(a)[0] == 1 and memoryview(b)[9999] == 2
    assert a.ptr % 4096 == 0 and b.ptr % 4096 == 0  # page-aligned slots
    assert abs(a.ptr - b.ptr) >= 10_000


def test_exhaustion_is_none_not_a_crash_and_slots_are_reused():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=2)
    s1, s2 = pool.acquire(), pool.acquire()
    assert pool.free_slots == 0
    assert pool.acquire() is None
    assert pool.acquire_many(1) is None
    freed = s1.index
    s1.release()
    assert s1.released
    s3 = pool.acquire()
    assert s3.index == freed
    del s2
    gc.collect()
    assert pool.free_slots == 1


def test_acquire_many_is_all_or_nothing():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=4)
    got = pool.acquire_many(3)
    assert len(got) == 3 and pool.free_slots == 1
    assert pool.acquire_many(2) is None
    assert pool.free_slots == 1


def test_shared_handles_keep_the_slot_until_the_last_release():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=1)
    s = pool.acquire()
    twin = s.share()
    assert s.refcount == 2 and twin.index == s.index
    s.release()
    assert pool.acquire() is None
    twin.release()
    assert pool.free_slots == 1


def test_released_slot_refuses_access_and_double_release_is_harmless():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=1)
    s = pool.acquire()
    s.release()
    s.release()
    with pytest.raises(RuntimeError, match="released"):
        _ = s.ptr
    assert pool.free_slots == 1


def test_slots_outlive_the_pool_object():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=1)
    s = pool.acquire()
    del pool
    gc.collect()
    np.frombuffer(s, dtype=np.uint8)[:] = 7  # region still mapped while a slot lives
    assert memoryview(s)[100] == 7


@pytest.mark.parametrize("slot_bytes,num_slots", [(0, 4), (4096, 0), (1 << 62, 1 << 20)])
def test_bad_sizes_raise(slot_bytes, num_slots):
    with pytest.raises((ValueError, MemoryError)):
        membrain.HostPool(slot_bytes=slot_bytes, num_slots=num_slots)


def test_concurrent_acquire_release_never_hands_out_a_slot_twice():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=8)
    errors = []

    def worker(tag: int):
        for _ in range(2000):
            s = pool.acquire()
            if s is None:
                continue
            view = np.frombuffer(s, dtype=np.uint8)
            view[:8] = tag
            if not (view[:8] == tag).all():
                errors.append("slot shared between holders")
            del view
            s.release()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.free_slots == 8


def test_pinning_follows_cuda_availability():
    pool = membrain.HostPool(slot_bytes=4096, num_slots=2)
    assert pool.pinned == (membrain.native_info()["cuda_devices"] > 0)


def _first_write_faults(pool: membrain.HostPool, n: int) -> int:
    """Minor faults of writing every byte of ``n`` slots (this thread's only)."""
    import resource

    slots = [pool.acquire() for _ in range(n)]
    f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for s in slots:
        np.frombuffer(s, dtype=np.uint8)[:] = 7
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0
    for s in slots:
        s.release()
    return faults


def test_prefault_backs_slots_without_changing_their_bytes():
    """A prefaulted slot's first write takes no page fault, and prefaulting beside a slot that
    already holds data leaves its bytes alone."""
    n, slot_bytes = 64, 256 << 10
    pages = n * slot_bytes // 4096
    cold = membrain.HostPool(slot_bytes, n, pin=False, huge_pages=False)
    assert _first_write_faults(cold, n) >= pages  # the cost prefaulting removes

    pool = membrain.HostPool(slot_bytes, n, pin=False, huge_pages=False)
    held = pool.acquire()
    np.frombuffer(held, dtype=np.uint8)[:] = 0xAB
    if pool.prefault(0, n) == 0:
        pytest.skip("kernel without MADV_POPULATE_WRITE (Linux < 5.14)")
    assert (np.frombuffer(held, dtype=np.uint8) == 0xAB).all()
    held.release()
    assert _first_write_faults(pool, n) < pages // 16
    assert pool.prefault(n, 1) == 0 and pool.prefault(0, 0) == 0  # out of range: nothing to do
    assert pool.prefault(n - 1, 100) == 256 << 10  # clipped to the pool


def test_host_store_prefaults_every_slot():
    from membrain.tiers.host import HostStore

    store = HostStore(1 << 20, capacity_blocks=48, headroom=16, pin=False)
    store.prefault()
    if store.prefaulted_bytes == 0:
        pytest.skip("kernel without MADV_POPULATE_WRITE (Linux < 5.14)")
    assert store.prefaulted_bytes == store.pool.num_slots * store.pool.slot_bytes == 64 << 20
    assert _first_write_faults(store.pool, 64) < 64 * 256 // 16
    store.close()


def test_a_prefault_the_kernel_refuses_stops_and_leaves_the_slots_usable():
    """Kernels before 5.14 (no MADV_POPULATE_WRITE) or short memory: the prefault stops where
    the kernel refused, says so, and the slots still work (backed as they fill)."""
    from membrain.tiers.host import PREFAULT_STEP_BYTES, HostStore

    store = HostStore(1 << 20, capacity_blocks=200, headroom=0, pin=False)
    real = store.pool
    if real.prefault(0, 1) == 0:
        pytest.skip("kernel without MADV_POPULATE_WRITE (Linux < 5.14)")

    class RefusesAfterOneStep:  # the native pool, whose kernel stops populating after one step
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name: str):
            return getattr(real, name)

        def prefault(self, first: int, count: int) -> int:
            self.calls += 1
            return real.prefault(first, count) if self.calls == 1 else 0

    store.pool = RefusesAfterOneStep()  # type: ignore[assignment]
    store.prefault()
    assert 0 < store.prefaulted_bytes <= PREFAULT_STEP_BYTES < 200 << 20
    assert store.pool.calls == 2  # stopped at the first refusal
    slot = store.acquire()
    np.frombuffer(slot, dtype=np.uint8)[:] = 5
    assert memoryview(slot)[(1 << 20) - 1] == 5
    slot.release()
    store.close()
