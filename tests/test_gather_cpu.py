"""CPU gather/scatter: every vLLM KV cache layout x dtype x head size x block size x kernel-block
ratio, built by vLLM's own code (tests/kv_layouts.py), bit for bit against the logical views; and
every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kv_layouts import (
    LAYOUTS,
    POISON,
    block_compact,
    case_id,
    expected_page_order,
    layout_cases,
    make_kv_caches,
    reference_gather,
    same_bytes,
    shape_for,
)

import membrain
from membrain import _native as native
from membrain import ops


def _poisoned(nbytes: int) -> torch.Tensor:
    return torch.full((nbytes,), POISON, dtype=torch.uint8)


@pytest.mark.parametrize(
    "layout,ratio,dtype,head_size,block_size",
    layout_cases(),
    ids=case_id,
)
def test_every_layout_round_trips_bit_for_bit(layout, ratio, dtype, head_size, block_size, rng):
    num_blocks = 9
    layers, heads = shape_for(layout, ratio, head_size)
    args = (layout, layers, num_blocks, block_size, heads, head_size, dtype)
    kv = make_kv_caches(*args, seed=block_size + head_size, kernel_ratio=ratio)
    desc = ops.describe_kv_caches(kv, num_blocks)
    order = expected_page_order(layout, heads, block_size // ratio)
    assert (desc.page_order, desc.kernel_ratio, desc.num_blocks) == (order, ratio, num_blocks)
    assert desc.kernel_block_size == block_size // ratio

    ids = rng.integers(0, num_blocks, size=5).tolist() + [0, num_blocks - 1, 4, 4]
    packed = _poisoned(desc.packed_nbytes(len(ids)))
    ops.gather_blocks(desc, ids, packed)
    assert torch.equal(packed, reference_gather(kv, ids, order, ratio))

    # Scatter into other block ids of a poisoned cache: the pages land there, nothing else moves.
    dest = make_kv_caches(*args, kernel_ratio=ratio, fill=POISON)
    unique = list(dict.fromkeys(ids))
    targets = [(b + 3) % num_blocks for b in unique]
    src = torch.cat([packed.view(len(ids), -1)[ids.index(b)] for b in unique])
    ops.scatter_blocks(src, ops.describe_kv_caches(dest, num_blocks), targets)
    back = _poisoned(src.numel())
    ops.gather_blocks(ops.describe_kv_caches(dest, num_blocks), targets, back)
    assert torch.equal(back, src)
    for layer_new, layer_old in zip(dest, kv):
        for b, t in zip(unique, targets):
            assert same_bytes(layer_new[t * ratio : (t + 1) * ratio], layer_old[b * ratio : (b + 1) * ratio])
        for t in sorted(set(range(num_blocks)) - set(targets)):
            assert (layer_new[t * ratio : (t + 1) * ratio].contiguous().view(torch.uint8) == POISON).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_description_of_each_layout(layout):
    kv = make_kv_caches(layout, 4, 6, 16, 8, 128, torch.bfloat16)
    desc = ops.describe_kv_caches(kv)
    page = 8 * 16 * 256 * 2
    assert desc.page_bytes == page
    assert desc.page_order == ("NHC" if layout in ("LBNHC", "BLNHC") else "HNC")
    compact = block_compact(layout)
    # Block-compact layouts move one run per page; LHBNC/BHLNC one run per head.
    assert (desc.run_count, desc.run_bytes) == ((1, page) if compact else (8, page // 8))
    assert desc.block_is_one_run == (layout in ("BLHNC", "BLNHC"))


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLHNC", "BLNHC"])
def test_padded_pages_skip_the_padding(layout):
    # Hybrid models pad pages to one size: only block-compact layouts allow it (vLLM asserts).
    page = 2 * 16 * 128 * 2
    kv = make_kv_caches(layout, 3, 7, 16, 2, 64, torch.float16, page_size_padded=page + 96)
    desc = ops.describe_kv_caches(kv)
    assert desc.page_bytes == page and not desc.block_is_one_run
    ids = [6, 0, 3, 3]
    out = _poisoned(desc.packed_nbytes(len(ids)))
    ops.gather_blocks(desc, ids, out)
    order = expected_page_order(layout, 2, 16)
    assert torch.equal(out, reference_gather(kv, ids, order))
    dest = make_kv_caches(layout, 3, 7, 16, 2, 64, torch.float16, page_size_padded=page + 96, fill=POISON)
    ops.scatter_blocks(out, dest, ids)
    back = _poisoned(out.numel())
    ops.gather_blocks(dest, ids, back)
    assert torch.equal(back, out)
    # The padding after each written page is never touched.
    d = ops.describe_kv_caches(dest)
    raw = torch.frombuffer(bytearray(bytes(dest[0].untyped_storage())), dtype=torch.uint8)
    base = dest[0].untyped_storage().data_ptr()
    for ptr in d.layer_ptrs:
        for b in set(ids):
            at = ptr - base + b * d.block_stride + d.page_bytes
            assert (raw[at : at + 96] == POISON).all()


def test_adjacent_kernel_blocks_merge_into_one_run():
    # NHC: the kernel blocks of a KV block are [Nk, H, C] pages back to back = [N, H, C].
    kv = make_kv_caches("LBNHC", 2, 6, 128, 4, 64, torch.float16, kernel_ratio=4)
    desc = ops.describe_kv_caches(kv, 6)
    assert kv[0].shape[0] == 24 and desc.num_blocks == 6 and desc.kernel_ratio == 4
    assert (desc.sub_count, desc.run_count, desc.run_bytes) == (1, 1, desc.page_bytes)


def test_split_hnc_pages_pack_as_the_whole_kv_block():
    # HNC: packed bytes are the KV block's [H, N, C] whatever the kernel split, so a backend that
    # splits blocks shares KV with one that does not: heads outer, kernel blocks inner.
    split = make_kv_caches("LBHNC", 2, 6, 128, 4, 64, torch.float16, kernel_ratio=4)
    desc = ops.describe_kv_caches(split, 6)
    assert (desc.sub_count, desc.run_count, desc.run_bytes) == (4, 4, 32 * 128 * 2)
    whole = make_kv_caches("LBHNC", 2, 6, 128, 4, 64, torch.float16, fill=0)
    for layer_split, layer_whole in zip(split, whole):  # the same logical cache, unsplit
        layer_whole.copy_(layer_split.reshape(6, 4, 4, 32, 128).transpose(1, 2).reshape(6, 4, 128, 128))
    a = torch.empty(ops.packed_nbytes(whole, 3), dtype=torch.uint8)
    b = torch.empty_like(a)
    ops.gather_blocks(ops.describe_kv_caches(whole, 6), [5, 0, 2], a)
    ops.gather_blocks(desc, [5, 0, 2], b)
    assert same_bytes(a, b)


@pytest.mark.parametrize("layout", ["BLNHC", "LHBNC"])
def test_vllm_refuses_kernel_split_of_sparse_pages(layout):
    # Why the matrix above splits these layouts only with one layer / one head.
    with pytest.raises(ValueError, match="dense"):
        make_kv_caches(layout, 2, 6, 16, 2, 64, torch.float16, kernel_ratio=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scheduler_validates_meta_views_like_the_worker(layout):
    # The scheduler has no KV memory: vLLM's views built on the meta device give the same
    # description, layer_ptrs being byte offsets into the buffer.
    real = make_kv_caches(layout, 3, 8, 16, 2, 64, torch.bfloat16)
    meta = make_kv_caches(layout, 3, 8, 16, 2, 64, torch.bfloat16, device="meta")
    base = real[0].untyped_storage().data_ptr()
    offsets = [t.data_ptr() - base for t in real]
    by_numbers = ops.describe_layer_views(
        real[0].shape,
        [s * real[0].element_size() for s in real[0].stride()],
        offsets,
        real[0].element_size(),
        num_blocks=8,
    )
    worker = ops.describe_kv_caches(real, 8)
    for field in ("num_blocks", "page_bytes", "block_stride", "sub_count", "run_count", "run_stride"):
        assert getattr(by_numbers, field) == getattr(worker, field)
    assert (by_numbers.page_order, by_numbers.block_is_one_run) == (
        worker.page_order,
        worker.block_is_one_run,
    )
    assert ops.describe_kv_caches(meta, 8).page_order == worker.page_order
    with pytest.raises(ValueError, match="meta"):
        ops.gather_blocks(ops.describe_kv_caches(meta, 8), [0], _poisoned(worker.packed_nbytes(1)))


@pytest.mark.parametrize("layout", ["BLNHC", "BLHNC"])
def test_adjacent_block_ids_of_whole_block_layouts(layout):
    # Whole-block runs continue across consecutive ids; threads split those merged runs, and a
    # duplicate in the middle of a consecutive run must still leave its last occurrence.
    kv = make_kv_caches(layout, 4, 64, 16, 2, 64, torch.bfloat16, seed=3)
    ids = list(range(10, 50)) + [5, 6, 7, 6, 63]
    ops.set_num_threads(3)
    try:
        out = _poisoned(ops.packed_nbytes(kv, len(ids)))
        ops.gather_blocks(kv, ids, out)
        assert torch.equal(out, reference_gather(kv, ids, "NHC" if layout == "BLNHC" else "HNC"))
        dest = make_kv_caches(layout, 4, 64, 16, 2, 64, torch.bfloat16, fill=0)
        src = torch.randint(0, 256, (out.numel(),), dtype=torch.uint8)
        ops.scatter_blocks(src, dest, ids)
        rows = src.view(len(ids), -1)
        back = _poisoned(ops.packed_nbytes(kv, 3))
        ops.gather_blocks(dest, [5, 6, 7], back)
        assert torch.equal(back, torch.cat([rows[40], rows[43], rows[42]]))  # 6: last occurrence
    finally:
        ops.set_num_threads(0)


@given(
    sub_count=st.integers(1, 3),
    run_count=st.integers(1, 4),
    run_bytes=st.integers(1, 40),
    gaps=st.lists(st.integers(0, 7), min_size=4, max_size=4),
    num_layers=st.integers(1, 3),
    order=st.permutations(["run", "sub", "block", "layer"]),
    ids=st.lists(st.integers(0, 5), max_size=12),
)
def test_property_any_nested_run_description_matches_numpy(
    sub_count, run_count, run_bytes, gaps, num_layers, order, ids
):
    """Raw run descriptions: dims nested in any order with gaps (padding) between them."""
    from membrain import _native

    counts = {"run": run_count, "sub": sub_count, "block": 6, "layer": num_layers}
    strides, extent = {}, run_bytes
    for dim, gap in zip(order, gaps):
        strides[dim] = extent + gap
        extent = strides[dim] * counts[dim]
    mem = np.random.default_rng(extent).integers(0, 256, size=extent, dtype=np.uint8)
    base = mem.ctypes.data
    layer_ptrs = [base + l * strides["layer"] for l in range(num_layers)]
    page = sub_count * run_count * run_bytes
    runs = {
        "sub_count": sub_count,
        "sub_stride": strides["sub"],
        "run_count": run_count,
        "run_stride": strides["run"],
    }
    expected = [
        mem[o : o + run_bytes]
        for b in ids
        for l in range(num_layers)
        for j in range(sub_count)
        for h in range(run_count)
        for o in [l * strides["layer"] + b * strides["block"] + j * strides["sub"] + h * strides["run"]]
    ]
    out = np.full(len(ids) * num_layers * page, POISON, dtype=np.uint8)
    _native.gather_cpu(
        layer_ptrs,
        6,
        page,
        strides["block"],
        np.array(ids, dtype=np.int64),
        out.ctypes.data,
        out.nbytes,
        **runs,
    )
    assert np.array_equal(out, np.concatenate(expected) if expected else out)
    mem2 = np.zeros_like(mem)
    ptrs2 = [mem2.ctypes.data + l * strides["layer"] for l in range(num_layers)]
    _native.scatter_cpu(
        out.ctypes.data, out.nbytes, ptrs2, 6, page, strides["block"], np.array(ids, dtype=np.int64), **runs
    )
    back = np.full_like(out, POISON)
    _native.gather_cpu(
        ptrs2, 6, page, strides["block"], np.array(ids, dtype=np.int64), back.ctypes.data, back.nbytes, **runs
    )
    assert np.array_equal(back, out)


@pytest.mark.parametrize("num_ids", [1, 2, 17, 1000, 4096])
def test_block_counts_from_one_to_thousands(num_ids, rng):
    kv = make_kv_caches(
        "LBHNC",
        num_layers=2,
        num_blocks=512,
        block_size=16,
        num_kv_heads=1,
        head_size=16,
        dtype=torch.float16,
        seed=num_ids,
    )
    ids = rng.integers(0, 512, size=num_ids)
    out = _poisoned(ops.packed_nbytes(kv, num_ids))
    ops.gather_blocks(kv, torch.as_tensor(ids), out)  # int tensor ids
    assert torch.equal(out, reference_gather(kv, ids.tolist()))


def test_odd_one_byte_pages_split_across_threads():
    # 3-byte fp8-like pages; 50k of them so several threads share pages unevenly.
    kv = [torch.randint(0, 256, (60000, 3), dtype=torch.uint8) for _ in range(2)]
    ids = list(range(59999, -1, -1))[:50000]
    out = _poisoned(ops.packed_nbytes(kv, len(ids)))
    ops.gather_blocks(kv, ids, out)
    assert torch.equal(out, reference_gather(kv, ids))


def test_large_pages_split_within_a_page():
    kv = [torch.randint(0, 256, (4, 1 << 20), dtype=torch.uint8) for _ in range(2)]  # 1 MiB pages
    out = _poisoned(ops.packed_nbytes(kv, 2))
    ops.gather_blocks(kv, [3, 1], out)
    assert torch.equal(out, reference_gather(kv, [3, 1]))


# Lengths around the streaming copy's pieces: the 64-byte line, the four-page (16 KiB) group.
STREAM_LENGTHS = [0, 1, 63, 64, 65, 4095, 16383, 16384, 16385, 3 * 16384 + 4096 + 77]


@pytest.mark.parametrize("streaming", [False, True])
def test_contiguous_copy_any_alignment_and_length(streaming):
    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, size=(1 << 17) + 256, dtype=np.uint8)
    for length in STREAM_LENGTHS:
        for src_off, dst_off in [(0, 0), (1, 0), (0, 17), (33, 63), (48, 16)]:
            dst = np.full(length + 256, 0xA5, dtype=np.uint8)
            native.memcpy_cpu(dst.ctypes.data + dst_off, src.ctypes.data + src_off, length, streaming)
            assert np.array_equal(dst[dst_off : dst_off + length], src[src_off : src_off + length]), (
                length,
                src_off,
                dst_off,
            )
            # Nothing outside the destination range is touched.
            assert (dst[:dst_off] == 0xA5).all() and (dst[dst_off + length :] == 0xA5).all()


@pytest.mark.parametrize("pages", ["whole-block", "odd"])
def test_streaming_gather_and_scatter_past_the_threshold(pages, rng):
    # Past 8 MiB the copies use streaming stores over four-page groups; runs of an odd size
    # leave every run's start misaligned, whole-block runs (BLNHC) are 128 KiB each.
    if pages == "whole-block":
        kv = make_kv_caches("BLNHC", 8, 160, 16, 4, 64, torch.bfloat16, seed=3)
        fresh = make_kv_caches("BLNHC", 8, 160, 16, 4, 64, torch.bfloat16, seed=4)
    else:
        kv = [torch.randint(0, 256, (4000, 16411), dtype=torch.uint8) for _ in range(2)]
        fresh = [torch.zeros_like(layer) for layer in kv]
    num_blocks = kv[0].shape[0]
    ids = rng.permutation(num_blocks)[: num_blocks * 3 // 4].tolist()
    out = _poisoned(ops.packed_nbytes(kv, len(ids)))
    assert out.numel() >= 8 << 20
    ops.gather_blocks(kv, ids, out)
    order = "NHC" if pages == "whole-block" else "HNC"
    assert same_bytes(out, reference_gather(kv, ids, order))
    ops.scatter_blocks(out, fresh, ids)
    for layer, copy in zip(kv, fresh, strict=True):
        assert same_bytes(copy[ids], layer[ids])


def test_copies_on_the_calling_thread_alone_match_the_pool(rng):
    """threads=1 (background loads beside running requests) moves the same bytes as the pool,
    on the calling thread only: no copy-pool worker runs meanwhile."""
    kv = make_kv_caches("LBNHC", 8, 96, 16, 4, 64, torch.bfloat16, seed=5)
    fresh = make_kv_caches("LBNHC", 8, 96, 16, 4, 64, torch.bfloat16, seed=6)
    ids = rng.permutation(96)[:64].tolist()
    out = _poisoned(ops.packed_nbytes(kv, len(ids)))
    assert out.numel() >= 4 << 20  # large enough that the pool would split it
    ops.gather_blocks(kv, ids, out, threads=1)
    assert same_bytes(out, reference_gather(kv, ids, "NHC"))
    busy = _pool_cpu_seconds()
    for _ in range(60):  # with the pool, its threads show >= 30 ms of CPU over these
        ops.scatter_blocks(out, fresh, ids, threads=1)
    assert _pool_cpu_seconds() - busy < 0.005
    for layer, copy in zip(kv, fresh, strict=True):
        assert same_bytes(copy[ids], layer[ids])


def _pool_cpu_seconds() -> float:
    """CPU time of the copy pool's threads (named membrain-copy; Linux /proc)."""
    import os

    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() != "membrain-copy":
                continue
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def test_scatter_duplicates_last_occurrence_wins():
    kv = [torch.zeros(8, 64, dtype=torch.uint8)]
    src = torch.arange(3 * 64, dtype=torch.int64).remainder(251).to(torch.uint8)
    ops.scatter_blocks(src, kv, [5, 2, 5])
    assert torch.equal(kv[0][5], src[128:192])
    assert torch.equal(kv[0][2], src[64:128])


def test_gather_into_host_pool_slot_and_numpy():
    kv = make_kv_caches("LBNHC", 4, 32, 16, 2, 64, torch.bfloat16)
    page = ops.describe_kv_caches(kv).page_bytes
    expected = reference_gather(kv, [1, 2, 3, 4], "NHC").numpy()
    pool = membrain.HostPool(slot_bytes=4 * 4 * page, num_slots=2)
    slot = pool.acquire()
    ops.gather_blocks(kv, [1, 2, 3, 4], slot)
    view = np.frombuffer(slot, dtype=np.uint8)
    assert np.array_equal(view, expected)
    arr = np.full(4 * 4 * page, POISON, dtype=np.uint8)
    ops.gather_blocks(kv, [1, 2, 3, 4], arr)
    assert np.array_equal(arr, view)


def test_empty_id_list_is_a_no_op():
    kv = make_kv_caches("LBHNC", 1, 4, 16, 1, 16, torch.float32)
    out = _poisoned(16)
    ops.gather_blocks(kv, [], out)
    assert (out == POISON).all()


@given(
    num_blocks=st.integers(1, 64),
    num_layers=st.integers(1, 5),
    page_elems=st.integers(1, 300),
    ids=st.lists(st.integers(0, 10_000), min_size=0, max_size=80),
    threads=st.integers(1, 4),
)
def test_property_gather_matches_reference(num_blocks, num_layers, page_elems, ids, threads):
    ids = [i % num_blocks for i in ids]
    gen = torch.Generator().manual_seed(num_blocks * 1000 + page_elems)
    kv = [
        torch.randint(0, 256, (num_blocks, page_elems), dtype=torch.uint8, generator=gen)
        for _ in range(num_layers)
    ]
    ops.set_num_threads(threads)
    try:
        out = _poisoned(ops.packed_nbytes(kv, len(ids)))
        ops.gather_blocks(kv, ids, out)
        assert torch.equal(out, reference_gather(kv, ids))
        back = [torch.zeros_like(t) for t in kv]
        ops.scatter_blocks(out, back, ids)
        for b in set(ids):
            for l in range(num_layers):
                assert same_bytes(back[l][b], kv[l][b])
    finally:
        ops.set_num_threads(0)


# --- bad input: a clear exception and not one byte written ----------------------------------


@pytest.fixture
def small_kv():
    return make_kv_caches("LBHNC", 2, 8, 16, 1, 16, torch.float16)


@pytest.mark.parametrize("bad_id", [8, 100, -1, -8])
def test_out_of_range_or_negative_id_raises_index_error(small_kv, bad_id):
    out = _poisoned(ops.packed_nbytes(small_kv, 3))
    with pytest.raises(IndexError, match=f"block id {bad_id}"):
        ops.gather_blocks(small_kv, [0, 1, bad_id], out)
    assert (out == POISON).all()
    before = [t.clone() for t in small_kv]
    with pytest.raises(IndexError):
        ops.scatter_blocks(out, small_kv, [bad_id, 0, 1])
    assert all(same_bytes(a, b) for a, b in zip(before, small_kv))


def test_output_too_small_raises(small_kv):
    out = _poisoned(ops.packed_nbytes(small_kv, 2) - 1)
    with pytest.raises(ValueError, match="needed"):
        ops.gather_blocks(small_kv, [0, 1], out)
    assert (out == POISON).all()
    with pytest.raises(ValueError, match="needed"):
        ops.scatter_blocks(out, small_kv, [0, 1])


def test_layers_of_different_shape_or_dtype_raise(small_kv):
    out = _poisoned(ops.packed_nbytes(small_kv, 1) * 2)
    odd_shape = small_kv + [torch.zeros(9, 1, 16, 32, dtype=torch.float16)]
    with pytest.raises(ValueError, match="shape"):
        ops.gather_blocks(odd_shape, [0], out)
    odd_dtype = small_kv + [torch.zeros(8, 1, 16, 32, dtype=torch.float32)]
    with pytest.raises(ValueError, match="dtype"):
        ops.gather_blocks(odd_dtype, [0], out)


def test_non_contiguous_pages_raise():
    base = torch.zeros(8, 16, 64, dtype=torch.float16)
    strided = [base.transpose(1, 2)]  # each page is a transposed, non-contiguous view
    with pytest.raises(ValueError, match="not contiguous"):
        ops.gather_blocks(strided, [0], torch.empty(16 * 64 * 2, dtype=torch.uint8))


def test_non_contiguous_output_and_bad_ids_raise(small_kv):
    page = ops.describe_kv_caches(small_kv).page_bytes
    out = torch.empty(4 * page * 2, dtype=torch.uint8)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        ops.gather_blocks(small_kv, [0], out)
    with pytest.raises(ValueError, match="integers"):
        ops.gather_blocks(small_kv, [0.5], torch.empty(4 * page, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one-dimensional"):
        ops.gather_blocks(small_kv, [[0]], torch.empty(4 * page, dtype=torch.uint8))
    with pytest.raises(ValueError, match="read-only"):
        ops.gather_blocks(small_kv, [0], bytes(4 * page))


def test_empty_layer_list_and_wrong_types_raise():
    with pytest.raises(ValueError, match="empty"):
        ops.gather_blocks([], [0], torch.empty(16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"torch\.Tensor"):
        ops.gather_blocks([np.zeros((4, 4))], [0], torch.empty(16, dtype=torch.uint8))


def test_cpu_cache_with_gpu_like_output_is_rejected(small_kv):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CPU/GPU mismatch check needs a CUDA tensor")
    out = torch.empty(ops.packed_nbytes(small_kv, 1), dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="CPU"):
        ops.gather_blocks(small_kv, [0], out)


def test_raw_native_entry_points_validate_too():
    from membrain import _native

    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="no layers"):
        _native.gather_cpu([], 4, 16, 16, np.array([0]), buf.ctypes.data, 64)
    with pytest.raises(ValueError, match="overlap"):
        _native.gather_cpu([buf.ctypes.data], 4, 16, 8, np.array([0]), buf.ctypes.data, 64)
    with pytest.raises(IndexError):
        _native.gather_cpu([buf.ctypes.data], 4, 16, 16, np.array([4]), buf.ctypes.data, 64)


def test_kernel_ratio_must_divide_dim0_and_nothing_is_written():
    kv = make_kv_caches("LBNHC", 2, 8, 16, 2, 64, torch.float16, kernel_ratio=2)  # dim 0 = 16
    with pytest.raises(ValueError, match="not a multiple of num_blocks=5"):
        ops.describe_kv_caches(kv, 5)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        ops.describe_kv_caches(kv, 0)
    desc = ops.describe_kv_caches(kv, 8)
    out = _poisoned(desc.packed_nbytes(1))
    with pytest.raises(IndexError, match="block id 8"):  # a kernel row id is not a KV block id
        ops.gather_blocks(desc, [8], out)
    assert (out == POISON).all()


def test_overlapping_layers_are_rejected_before_writing():
    kv = make_kv_caches("LBHNC", 2, 8, 16, 2, 64, torch.float16)
    twice = [kv[0], kv[0]]  # the same memory described as two layers
    before = kv[0].clone()
    with pytest.raises(ValueError, match="overlap"):
        ops.scatter_blocks(_poisoned(ops.packed_nbytes(kv, 1)), twice, [0])
    assert same_bytes(before, kv[0])


def test_views_that_are_no_vllm_layout_are_rejected():
    base = torch.zeros(8, 16, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not contiguous"):  # heads inside tokens, tokens sparse
        ops.describe_kv_caches([base.permute(0, 2, 1, 3)[:, :, ::2]])
    with pytest.raises(ValueError, match="dim 3"):
        ops.describe_kv_caches([torch.zeros(8, 2, 16, 128)[..., ::2]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"run_count": 3}, "does not split into sub_count \\* run_count = 3"),
        ({"run_count": 2, "run_stride": 4}, "run_stride 4 is smaller than the 8 bytes"),
        (
            {"sub_count": 2, "sub_stride": 8, "run_count": 2, "run_stride": 6},
            "sub_stride 8 is smaller than the 10 bytes spanned by one run_stride",
        ),
        ({"sub_count": 0}, "sub_count must be positive, got 0"),
        ({"run_count": 2, "run_stride": -8}, "run_stride must not be negative, got -8"),
    ],
)
def test_raw_run_descriptions_are_validated(kwargs, match):
    from membrain import _native

    mem = np.zeros(4096, dtype=np.uint8)
    out = np.full(64, POISON, dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        _native.gather_cpu([mem.ctypes.data], 4, 16, 256, np.array([0]), out.ctypes.data, 64, **kwargs)
    with pytest.raises(ValueError, match=match):
        _native.describe_paged_layout([0], 4, 16, 256, **kwargs)
    assert (out == POISON).all()


def test_thread_count_is_configurable():
    ops.set_num_threads(3)
    try:
        assert ops.get_num_threads() == 3
    finally:
        ops.set_num_threads(0)
    with pytest.raises(ValueError):
        ops.set_num_threads(-1)
