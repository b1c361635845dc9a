"""native_info() facts and XXH3-64 checksums."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import membrain


def test_native_info_fields():
    info = membrain.native_info()
    assert isinstance(info["version"], str) and info["version"] == membrain.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    assert isinstance(info["ucx"], bool)
    assert len(info["cuda_device_names"]) == info["cuda_devices"]


@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="no nvcc on this machine: CUDA kernels are not expected"
)
def test_cuda_kernels_are_compiled_where_nvcc_exists():
    assert membrain.native_info()["cuda_compiled"] is True


def test_checksum_known_vector_and_sensitivity():
    # XXH3-64 of the empty input with seed 0 (from the xxHash test vectors).
    assert membrain.checksum64(b"") == 0x2D06800538D394C2
    data = bytearray(np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes())
    h = membrain.checksum64(data)
    assert membrain.checksum64(bytes(data)) == h
    assert membrain.checksum64(np.frombuffer(bytes(data), dtype=np.uint8)) == h
    data[31337] ^= 1
    assert membrain.checksum64(data) != h
    assert membrain.checksum64(b"abc", seed=1) != membrain.checksum64(b"abc")


@pytest.mark.parametrize("size", [0, 17, 240, 241, 1024, 1025, 65536 + 7, (1 << 20) + 3])
def test_every_checksum_implementation_agrees(size):
    # The baseline and the AVX2 copy (where the CPU has it) must give the same XXH3, on the
    # short-input paths and on the vectorised long-input path (> 240 bytes), with and without
    # a seed; checksum64 uses one of them, picked at run time.
    from membrain import _native

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for seed in (0, 0x9E3779B97F4A7C15):
        paths = _native._checksum64_all_paths(data, seed)
        assert "base" in paths
        if "avx2" in (open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""):
            assert "avx2" in paths, paths
        assert len(set(paths.values())) == 1, paths
        assert membrain.checksum64(data, seed=seed) == paths["base"]


def test_checksum_of_slot_and_pointer_agree():
    from membrain import _native

    pool = membrain.HostPool(slot_bytes=8192, num_slots=1)
    s = pool.acquire()
    np.frombuffer(s, dtype=np.uint8)[:] = 3
    assert membrain.checksum64(s) == _native.checksum64_ptr(s.ptr, s.nbytes)


def test_checksum_rejects_strided_buffers():
    a = np.zeros((8, 8), dtype=np.uint8)[:, ::2]
    with pytest.raises((ValueError, BufferError)):
        membrain.checksum64(a)
