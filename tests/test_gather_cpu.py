"""CPU gather/scatter: round trips over vLLM's layouts and dtypes, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kv_layouts import DTYPES, LAYOUTS, make_kv_caches, reference_gather, same_bytes

import membrain
from membrain import ops

POISON = 0xA5


def _poisoned(nbytes: int) -> torch.Tensor:
    return torch.full((nbytes,), POISON, dtype=torch.uint8)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_round_trip_layouts_and_dtypes(layout, dtype, rng):
    kv = make_kv_caches(
        layout, num_layers=3, num_blocks=40, block_size=16, num_kv_heads=2, head_size=32, dtype=dtype
    )
    ids = rng.integers(0, 40, size=25).tolist() + [0, 39, 7, 7]  # duplicates and both ends
    out = _poisoned(ops.packed_nbytes(kv, len(ids)))
    ops.gather_blocks(kv, ids, out)
    assert torch.equal(out, reference_gather(kv, ids))

    fresh = [torch.zeros_like(t) for t in kv]
    ops.scatter_blocks(out, fresh, ids)
    for layer_new, layer_old in zip(fresh, kv):
        for b in set(ids):
            assert same_bytes(layer_new[b], layer_old[b])
        untouched = sorted(set(range(40)) - set(ids))
        assert not layer_new[untouched].view(torch.uint8).any()


@pytest.mark.parametrize("num_ids", [1, 2, 17, 1000, 4096])
def test_block_counts_from_one_to_thousands(num_ids, rng):
    kv = make_kv_caches(
        "cpu_attn",
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


def test_scatter_duplicates_last_occurrence_wins():
    kv = [torch.zeros(8, 64, dtype=torch.uint8)]
    src = torch.arange(3 * 64, dtype=torch.int64).remainder(251).to(torch.uint8)
    ops.scatter_blocks(src, kv, [5, 2, 5])
    assert torch.equal(kv[0][5], src[128:192])
    assert torch.equal(kv[0][2], src[64:128])


def test_gather_into_host_pool_slot_and_numpy():
    kv = make_kv_caches("flash_attn", 4, 32, 16, 2, 64, torch.bfloat16)
    page = ops.describe_kv_caches(kv).page_bytes
    pool = membrain.HostPool(slot_bytes=4 * 4 * page, num_slots=2)
    slot = pool.acquire()
    ops.gather_blocks(kv, [1, 2, 3, 4], slot)
    view = np.frombuffer(slot, dtype=np.uint8)
    assert np.array_equal(view, reference_gather(kv, [1, 2, 3, 4]).numpy())
    arr = np.full(4 * 4 * page, POISON, dtype=np.uint8)
    ops.gather_blocks(kv, [1, 2, 3, 4], arr)
    assert np.array_equal(arr, view)


def test_empty_id_list_is_a_no_op():
    kv = make_kv_caches("cpu_attn", 1, 4, 16, 1, 16, torch.float32)
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
    return make_kv_caches("cpu_attn", 2, 8, 16, 1, 16, torch.float16)


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
    with pytest.raises(ValueError, match="torch.Tensor"):
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


def test_thread_count_is_configurable():
    ops.set_num_threads(3)
    try:
        assert ops.get_num_threads() == 3
    finally:
        ops.set_num_threads(0)
    with pytest.raises(ValueError):
        ops.set_num_threads(-1)
