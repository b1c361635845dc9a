"""CUDA gather/scatter: the CPU suite's correctness checks, run against the CUDA kernels with the
packed buffer on the device, in pinned host memory ("mapped" and "staged") and in a HostPool
slot; plus every bad input and concurrent streams.

Skipped (with the reason printed by ``-ra``) where torch sees no CUDA device; runs unchanged on a
GPU machine. KV caches are vLLM's own per-layer views (tests/kv_layouts.py: every
KVCacheLayout, kernel-block splits), checked bit for bit against their logical views.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from kv_layouts import DTYPES, LAYOUTS, POISON, case_id, layout_cases, make_kv_caches, shape_for
from kv_layouts import reference_gather as logical_reference

import membrain
from membrain import _native, ops

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device: torch.cuda.is_available() is False (CPU-only torch or no GPU)"
)
# Where the packed side lives, and the mode the op is called with.
TARGETS = ("device", "pinned-mapped", "pinned-staged", "pinned-auto", "pool-mapped", "pool-staged")


# --- helpers ------------------------------------------------------------------------------


def make_kv(
    layout,
    num_layers,
    num_blocks,
    block_size,
    num_kv_heads,
    head_size,
    dtype,
    seed=0,
    device="cuda",
    kernel_ratio=1,
):
    """vLLM's per-layer views (one int8 backing buffer, the layout's strides), random bytes."""
    return make_kv_caches(
        layout,
        num_layers,
        num_blocks,
        block_size,
        num_kv_heads,
        head_size,
        dtype,
        device=device,
        seed=seed,
        kernel_ratio=kernel_ratio,
    )


def random_pages(num_layers, num_blocks, page_bytes, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (num_blocks, page_bytes), dtype=torch.uint8, generator=gen).to(device)
        for _ in range(num_layers)
    ]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def pages(t: torch.Tensor, ids) -> torch.Tensor:
    """Bytes of the logical pages `ids` of one layer, whatever its strides."""
    ids = [int(i) for i in ids]
    return torch.stack([as_bytes(t[b]) for b in ids]) if ids else torch.empty(0, dtype=torch.uint8)


def reference_gather(kv, ids) -> torch.Tensor:
    """Packed block-major bytes computed the slow, obvious way from the logical views (on CPU
    copies). The page order is the description's; the CPU suite checks it against each layout
    (test_description_of_each_layout)."""
    desc = ops.describe_kv_caches(kv)
    return logical_reference([t.cpu() for t in kv], [int(i) for i in ids], desc.page_order)


def poisoned_like(kv):
    """Poisoned caches with the same strides and layer placement: each backing storage is
    replaced by a poisoned one and every layer re-viewed onto it."""
    fresh, storages = [], {}
    for t in kv:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in storages:
            storages[key] = torch.full((storage.nbytes(),), POISON, dtype=torch.uint8, device=t.device)
        base = storages[key].view(t.dtype)
        fresh.append(torch.as_strided(base, t.shape, t.stride(), t.storage_offset()))
    return fresh


class Packed:
    """A packed buffer of one kind, poisoned, with a host-side byte view for checking."""

    def __init__(self, target: str, nbytes: int):
        self.kind, _, mode = target.partition("-")
        self.mode = mode or "auto"
        self.nbytes = nbytes
        self._pool = self.slot = None
        if self.kind == "device":
            self.buf = torch.full((nbytes,), POISON, dtype=torch.uint8, device="cuda")
        elif self.kind == "pinned":
            self.buf = torch.full((nbytes,), POISON, dtype=torch.uint8).pin_memory()
            assert self.buf.is_pinned()
        else:  # HostPool slot, page-locked by the pool when a device exists
            self._pool = membrain.HostPool(slot_bytes=max(nbytes, 1), num_slots=1)
            assert self._pool.pinned, "HostPool did not page-lock its region although a CUDA device exists"
            self.slot = self._pool.acquire()
            np.frombuffer(self.slot, dtype=np.uint8)[:] = POISON
            self.buf = self.slot

    def bytes(self) -> torch.Tensor:
        torch.cuda.synchronize()
        if self.kind == "device":
            return self.buf.cpu()
        if self.kind == "pinned":
            return self.buf.clone()
        return torch.from_numpy(np.frombuffer(self.slot, dtype=np.uint8)[: self.nbytes].copy())

    def close(self):
        if self.slot is not None:
            self.slot.release()


def gather_and_check(kv, ids, target):
    packed = Packed(target, ops.packed_nbytes(kv, len(ids)))
    ops.gather_blocks(kv, ids, packed.buf, mode=packed.mode)
    got = packed.bytes()
    want = reference_gather(kv, [int(i) for i in ids])
    assert torch.equal(got[: want.numel()], want), f"gather into {target} differs from the reference"
    return packed


def scatter_and_check(packed, kv, ids):
    """Scatters `packed` into poisoned copies of kv; pages of ids must match kv, others stay poison."""
    fresh = poisoned_like(kv)
    ops.scatter_blocks(packed.buf, fresh, ids, mode=packed.mode)
    torch.cuda.synchronize()
    wanted = sorted({int(i) for i in ids})
    untouched = sorted(set(range(kv[0].shape[0])) - set(wanted))
    for new, old in zip(fresh, kv):
        assert torch.equal(pages(new, wanted), pages(old, wanted))
        if untouched:
            assert bool((pages(new, untouched) == POISON).all()), "scatter wrote pages outside block_ids"


# --- always runs: the build's CUDA surface --------------------------------------------------


def test_cuda_entry_points_exist_exactly_when_compiled():
    compiled = membrain.native_info()["cuda_compiled"]
    for name in ("gather_cuda", "scatter_cuda", "cuda_memcpy"):
        assert hasattr(_native, name) == compiled, name
    if compiled:
        assert _native.cuda_default_host_mode in ("mapped", "staged")


@pytest.mark.skipif(not membrain.native_info()["cuda_compiled"], reason="this build has no CUDA kernels")
def test_raw_entry_points_validate_before_touching_the_device():
    # Fake addresses: validation must reject these before any CUDA call could dereference them.
    fake = [0x10000]
    with pytest.raises(ValueError, match="no layers"):
        _native.gather_cuda([], 4, 16, 16, np.array([0]), 0x20000, 64, 0, 0, "auto")
    with pytest.raises(ValueError, match="overlap"):
        _native.gather_cuda(fake, 4, 16, 8, np.array([0]), 0x20000, 64, 0, 0, "auto")
    with pytest.raises(IndexError, match="block id 4 at position 1"):
        _native.gather_cuda(fake, 4, 16, 16, np.array([0, 4]), 0x20000, 64, 0, 0, "auto")
    with pytest.raises(IndexError, match="block id -1 at position 0"):
        _native.scatter_cuda(0x20000, 64, fake, 4, 16, 16, np.array([-1]), 0, 0, "auto")
    with pytest.raises(ValueError, match="needed"):
        _native.gather_cuda(fake, 4, 16, 16, np.array([0, 1]), 0x20000, 31, 0, 0, "auto")
    with pytest.raises(ValueError, match="mode"):
        _native.gather_cuda(fake, 4, 16, 16, np.array([0]), 0x20000, 64, 0, 0, "fast")
    n = membrain.native_info()["cuda_devices"]
    with pytest.raises(ValueError, match="does not exist"):
        _native.gather_cuda(fake, 4, 16, 16, np.array([0]), 0x20000, 64, n, 0, "auto")


# --- correctness on a device ----------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_round_trip_layouts_dtypes_and_targets(layout, dtype, target):
    rng = np.random.default_rng(1234)
    kv = make_kv(
        layout, num_layers=3, num_blocks=40, block_size=16, num_kv_heads=2, head_size=32, dtype=dtype
    )
    ids = rng.integers(0, 40, size=25).tolist() + [0, 39, 7, 7]  # duplicates and both ends
    packed = gather_and_check(kv, ids, target)
    try:
        scatter_and_check(packed, kv, ids)
    finally:
        packed.close()


@needs_cuda
@pytest.mark.parametrize("target", ["device", "pinned-mapped", "pinned-staged"])
@pytest.mark.parametrize(
    "layout,ratio,dtype,head_size,block_size",
    layout_cases(),
    ids=case_id,
)
def test_every_layout_and_kernel_split(layout, ratio, dtype, head_size, block_size, target):
    num_blocks = 9
    layers, heads = shape_for(layout, ratio, head_size)
    kv = make_kv(
        layout, layers, num_blocks, block_size, heads, head_size, dtype, seed=head_size, kernel_ratio=ratio
    )
    desc = ops.describe_kv_caches(kv, num_blocks)
    ids = [4, 0, 8, 3, 4, 5, 6]
    packed = Packed(target, desc.packed_nbytes(len(ids)))
    try:
        ops.gather_blocks(desc, ids, packed.buf, mode=packed.mode)
        want = logical_reference([t.cpu() for t in kv], ids, desc.page_order, ratio)
        assert torch.equal(packed.bytes(), want)
        fresh = poisoned_like(kv)
        ops.scatter_blocks(packed.buf, ops.describe_kv_caches(fresh, num_blocks), ids, mode=packed.mode)
        torch.cuda.synchronize()
        rows = sorted({b * ratio + j for b in ids for j in range(ratio)})
        others = sorted(set(range(num_blocks * ratio)) - set(rows))
        for new, old in zip(fresh, kv):
            assert torch.equal(pages(new, rows), pages(old, rows))
            assert bool((pages(new, others) == POISON).all()), "scatter wrote outside block_ids"
    finally:
        packed.close()


@needs_cuda
@pytest.mark.parametrize("num_ids", [1, 2, 17, 1000, 4096])
@pytest.mark.parametrize("target", ["device", "pinned-mapped", "pinned-staged"])
def test_block_counts_from_one_to_thousands(num_ids, target):
    rng = np.random.default_rng(num_ids)
    kv = make_kv(
        "LBNHC",
        num_layers=2,
        num_blocks=512,
        block_size=16,
        num_kv_heads=1,
        head_size=16,
        dtype=torch.float16,
        seed=num_ids,
    )
    ids = rng.integers(0, 512, size=num_ids)
    packed = gather_and_check(kv, torch.as_tensor(ids), target)  # int tensor ids
    scatter_and_check(packed, kv, ids)


@needs_cuda
@pytest.mark.parametrize("page_bytes", [1, 2, 3, 6, 8, 12, 24, 40, 100, 4096 + 4, 65536 + 8])
@pytest.mark.parametrize("target", ["device", "pinned-mapped", "pinned-staged"])
def test_any_page_size_takes_a_narrower_path_correctly(page_bytes, target):
    # Odd fp8-like page sizes force 1/2/4/8-byte elements instead of 16-byte ones.
    rng = np.random.default_rng(page_bytes)
    kv = random_pages(num_layers=3, num_blocks=64, page_bytes=page_bytes, seed=page_bytes)
    ids = rng.integers(0, 64, size=50).tolist()
    packed = gather_and_check(kv, ids, target)
    scatter_and_check(packed, kv, ids)


@needs_cuda
@pytest.mark.parametrize("offset", [1, 2, 4, 8])
@pytest.mark.parametrize("where", ["device", "pinned"])
def test_misaligned_packed_pointer(offset, where):
    kv = make_kv("LBNHC", 2, 16, 16, 2, 64, torch.bfloat16, seed=offset)
    ids = [3, 1, 15, 0]
    need = ops.packed_nbytes(kv, len(ids))
    backing = torch.full((need + 16,), POISON, dtype=torch.uint8)
    backing = backing.cuda() if where == "device" else backing.pin_memory()
    out = backing[offset : offset + need]  # contiguous but only `offset`-aligned
    for mode in ("auto",) if where == "device" else ("mapped", "staged"):
        backing.fill_(POISON)
        ops.gather_blocks(kv, ids, out, mode=mode)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), reference_gather(kv, ids))
        assert bool((backing[:offset].cpu() == POISON).all()) and bool(
            (backing[offset + need :].cpu() == POISON).all()
        )
        fresh = poisoned_like(kv)
        ops.scatter_blocks(out, fresh, ids, mode=mode)
        torch.cuda.synchronize()
        for new, old in zip(fresh, kv):
            assert torch.equal(pages(new, ids), pages(old, ids))


@needs_cuda
def test_odd_one_byte_pages_many_blocks():
    kv = random_pages(num_layers=2, num_blocks=60000, page_bytes=3, seed=3)
    ids = list(range(59999, -1, -1))[:50000]
    for target in ("device", "pinned-mapped", "pinned-staged"):
        gather_and_check(kv, ids, target)


@needs_cuda
@pytest.mark.parametrize("target", ["device", "pinned-mapped", "pinned-staged"])
def test_large_pages_split_within_a_page(target):
    kv = random_pages(num_layers=2, num_blocks=4, page_bytes=1 << 20, seed=7)  # 1 MiB pages
    packed = gather_and_check(kv, [3, 1], target)
    scatter_and_check(packed, kv, [3, 1])


@needs_cuda
@pytest.mark.parametrize("target", ["device", "pinned-mapped", "pinned-staged", "pool-staged"])
def test_scatter_duplicates_last_occurrence_wins(target):
    kv = [torch.full((8, 64), POISON, dtype=torch.uint8, device="cuda")]
    src = torch.arange(4 * 64, dtype=torch.int64).remainder(251).to(torch.uint8)
    packed = Packed(target, src.numel())
    if packed.kind == "pool":
        np.frombuffer(packed.slot, dtype=np.uint8)[: src.numel()] = src.numpy()
    else:
        packed.buf.copy_(src)
    ops.scatter_blocks(packed.buf, kv, [5, 2, 5, 5], mode=packed.mode)
    torch.cuda.synchronize()
    got = kv[0].cpu()
    assert torch.equal(got[5], src[192:256])
    assert torch.equal(got[2], src[64:128])
    assert bool((got[[0, 1, 3, 4, 6, 7]] == POISON).all())
    packed.close()


@needs_cuda
def test_empty_id_list_is_a_no_op():
    kv = make_kv("LBHNC", 1, 4, 16, 1, 16, torch.float32)
    for target in ("device", "pinned-mapped", "pinned-staged"):
        packed = Packed(target, 16)
        ops.gather_blocks(kv, [], packed.buf, mode=packed.mode)
        assert bool((packed.bytes() == POISON).all())


@needs_cuda
def test_random_shapes_match_reference():
    rng = np.random.default_rng(99)
    for case in range(30):
        num_blocks = int(rng.integers(1, 65))
        num_layers = int(rng.integers(1, 6))
        page = int(rng.integers(1, 3000))
        ids = rng.integers(0, num_blocks, size=int(rng.integers(0, 80))).tolist()
        kv = random_pages(num_layers, num_blocks, page, seed=case)
        target = ("device", "pinned-mapped", "pinned-staged")[case % 3]
        packed = gather_and_check(kv, ids, target)
        scatter_and_check(packed, kv, ids)


@needs_cuda
def test_runs_on_the_given_stream_and_a_raw_stream_handle():
    kv = make_kv("LBNHC", 4, 64, 16, 2, 64, torch.float16, seed=5)
    ids = list(range(63, -1, -3))
    side = torch.cuda.Stream()
    out = torch.full((ops.packed_nbytes(kv, len(ids)),), POISON, dtype=torch.uint8, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    ops.gather_blocks(kv, ids, out, stream=side)
    side.synchronize()
    assert torch.equal(out.cpu(), reference_gather(kv, ids))
    out.fill_(POISON)
    torch.cuda.synchronize()
    ops.gather_blocks(kv, ids, out, stream=int(side.cuda_stream))
    side.synchronize()
    assert torch.equal(out.cpu(), reference_gather(kv, ids))


@needs_cuda
def test_back_to_back_calls_without_sync_keep_their_own_metadata():
    # Each call's ids reach the device through reusable staging; calls queued behind a slow
    # kernel must not see a later call's ids.
    kv = make_kv("LBNHC", 2, 256, 16, 2, 64, torch.bfloat16, seed=11)
    rng = np.random.default_rng(11)
    id_lists = [rng.integers(0, 256, size=int(rng.integers(1, 200))).tolist() for _ in range(40)]
    outs = [
        torch.full((ops.packed_nbytes(kv, len(ids)),), POISON, dtype=torch.uint8).pin_memory()
        for ids in id_lists
    ]
    torch.cuda._sleep(50_000_000)  # keep the stream busy while the host races ahead
    for i, (ids, out) in enumerate(zip(id_lists, outs)):
        ops.gather_blocks(kv, ids, out, mode=("mapped", "staged")[i % 2])
    torch.cuda.synchronize()
    for ids, out in zip(id_lists, outs):
        assert torch.equal(out, reference_gather(kv, ids))


@needs_cuda
def test_two_streams_two_threads_concurrently():
    kv = make_kv("LBHNC", 4, 128, 16, 2, 64, torch.float16, seed=21)
    errors = []

    def worker(seed, mode):
        try:
            rng = np.random.default_rng(seed)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for _ in range(20):
                    ids = rng.integers(0, 128, size=int(rng.integers(1, 64))).tolist()
                    out = torch.full(
                        (ops.packed_nbytes(kv, len(ids)),), POISON, dtype=torch.uint8
                    ).pin_memory()
                    ops.gather_blocks(kv, ids, out, mode=mode)
                    back = poisoned_like(kv)
                    ops.scatter_blocks(out, back, ids, mode=mode)
                    stream.synchronize()
                    assert torch.equal(out, reference_gather(kv, ids))
                    for new, old in zip(back, kv):
                        assert torch.equal(pages(new, ids), pages(old, ids))
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(s, m)) for s, m in ((1, "staged"), (2, "mapped"), (3, "auto"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@needs_cuda
def test_cuda_memcpy_binding():
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    dst = torch.full((1 << 20,), POISON, dtype=torch.uint8).pin_memory()
    stream = torch.cuda.current_stream()
    _native.cuda_memcpy(
        dst.data_ptr(), src.data_ptr(), src.numel(), src.device.index or 0, int(stream.cuda_stream)
    )
    stream.synchronize()
    assert torch.equal(dst, src.cpu())


# --- bad input: a clear exception and not one byte written ----------------------------------


@pytest.fixture
def small_kv():
    return make_kv("LBHNC", 2, 8, 16, 1, 16, torch.float16) if HAS_CUDA else None


@needs_cuda
@pytest.mark.parametrize("bad_id", [8, 100, -1, -8])
@pytest.mark.parametrize("target", ["device", "pinned-staged"])
def test_out_of_range_or_negative_id_raises_index_error(small_kv, bad_id, target):
    packed = Packed(target, ops.packed_nbytes(small_kv, 3))
    with pytest.raises(IndexError, match=f"block id {bad_id} at position 2"):
        ops.gather_blocks(small_kv, [0, 1, bad_id], packed.buf, mode=packed.mode)
    assert bool((packed.bytes() == POISON).all())
    before = [t.clone() for t in small_kv]
    with pytest.raises(IndexError, match=f"block id {bad_id} at position 0"):
        ops.scatter_blocks(packed.buf, small_kv, [bad_id, 0, 1], mode=packed.mode)
    torch.cuda.synchronize()
    assert all(torch.equal(as_bytes(a), as_bytes(b)) for a, b in zip(before, small_kv))


@needs_cuda
def test_output_too_small_raises(small_kv):
    for target in ("device", "pinned-mapped"):
        packed = Packed(target, ops.packed_nbytes(small_kv, 2) - 1)
        with pytest.raises(ValueError, match="needed"):
            ops.gather_blocks(small_kv, [0, 1], packed.buf, mode=packed.mode)
        assert bool((packed.bytes() == POISON).all())
        with pytest.raises(ValueError, match="needed"):
            ops.scatter_blocks(packed.buf, small_kv, [0, 1], mode=packed.mode)
    # The raw entry point checks too.
    kv = ops.describe_kv_caches(small_kv)
    out = torch.full((kv.page_bytes,), POISON, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="needed"):
        _native.gather_cuda(
            kv.layer_ptrs,
            kv.num_blocks,
            kv.page_bytes,
            kv.block_stride,
            np.array([0]),
            out.data_ptr(),
            out.numel(),
            0,
            0,
            "auto",
        )


@needs_cuda
def test_pageable_host_memory_raises_value_error(small_kv):
    need = ops.packed_nbytes(small_kv, 2)
    pageable = torch.full((need,), POISON, dtype=torch.uint8)
    assert not pageable.is_pinned()
    for mode in ("auto", "mapped", "staged"):
        with pytest.raises(ValueError, match="pageable host memory"):
            ops.gather_blocks(small_kv, [0, 1], pageable, mode=mode)
        with pytest.raises(ValueError, match="pageable host memory"):
            ops.scatter_blocks(pageable, small_kv, [0, 1], mode=mode)
    assert bool((pageable == POISON).all())
    arr = np.full(need, POISON, dtype=np.uint8)
    with pytest.raises(ValueError, match="pageable host memory"):
        ops.gather_blocks(small_kv, [0, 1], arr)
    unpinned_pool = membrain.HostPool(slot_bytes=need, num_slots=1, pin=False)
    with unpinned_pool.acquire() as slot, pytest.raises(ValueError, match="pageable host memory"):
        ops.gather_blocks(small_kv, [0, 1], slot)


@needs_cuda
def test_bad_mode_raises(small_kv):
    out = torch.empty(ops.packed_nbytes(small_kv, 1), dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="mode"):
        ops.gather_blocks(small_kv, [0], out, mode="fast")


@needs_cuda
def test_device_mismatch_raises(small_kv):
    kv = ops.describe_kv_caches(small_kv)
    out = torch.full((ops.packed_nbytes(small_kv, 1),), POISON, dtype=torch.uint8, device="cuda")
    # Raw entry point told the caches are on a device that does not exist.
    with pytest.raises(ValueError, match="does not exist"):
        _native.gather_cuda(
            kv.layer_ptrs,
            kv.num_blocks,
            kv.page_bytes,
            kv.block_stride,
            np.array([0]),
            out.data_ptr(),
            out.numel(),
            torch.cuda.device_count(),
            0,
            "auto",
        )
    # Layer pointers that are host memory, not device memory.
    host = torch.zeros(8, 1, 16, 32, dtype=torch.float16).pin_memory()
    with pytest.raises(ValueError, match="not device memory"):
        _native.gather_cuda(
            [host.data_ptr()],
            kv.num_blocks,
            kv.page_bytes,
            kv.block_stride,
            np.array([0]),
            out.data_ptr(),
            out.numel(),
            0,
            0,
            "auto",
        )
    if torch.cuda.device_count() < 2:
        pytest.skip("cross-device checks need two CUDA devices")
    other = torch.empty_like(out, device="cuda:1")
    with pytest.raises(ValueError, match="cuda:1"):
        ops.gather_blocks(small_kv, [0], other)
    other_kv = [t.to("cuda:1") for t in small_kv]
    with pytest.raises(ValueError, match="cuda"):
        _native.gather_cuda(
            [t.data_ptr() for t in other_kv],
            kv.num_blocks,
            kv.page_bytes,
            kv.block_stride,
            np.array([0]),
            out.data_ptr(),
            out.numel(),
            0,
            0,
            "auto",
        )
    with torch.cuda.device(1):
        s1 = torch.cuda.Stream()
    with pytest.raises(ValueError, match="stream"):
        ops.gather_blocks(small_kv, [0], out, stream=s1)


@needs_cuda
def test_non_contiguous_pages_and_output_raise():
    base = torch.zeros(8, 16, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="not contiguous"):
        ops.gather_blocks(
            [base.transpose(1, 2)], [0], torch.empty(16 * 64 * 2, dtype=torch.uint8, device="cuda")
        )
    kv = make_kv("LBHNC", 2, 8, 16, 1, 16, torch.float16)
    out = torch.empty(4 * ops.packed_nbytes(kv, 1), dtype=torch.uint8, device="cuda")[::2]
    with pytest.raises(ValueError, match="contiguous"):
        ops.gather_blocks(kv, [0], out)


@needs_cuda
def test_cuda_cache_with_mixed_layers_raises():
    kv = make_kv("LBHNC", 2, 8, 16, 1, 16, torch.float16)
    mixed = kv + [torch.zeros_like(kv[0], device="cpu")]
    with pytest.raises(ValueError, match="cpu"):
        ops.gather_blocks(
            mixed, [0], torch.empty(3 * ops.packed_nbytes(kv, 1), dtype=torch.uint8, device="cuda")
        )
