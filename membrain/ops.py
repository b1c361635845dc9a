"""Gather/scatter of paged KV blocks between vLLM's KV cache and packed buffers.

``kv_caches`` is a sequence of per-layer tensors whose dim 0 is the block index and whose page
``kv_caches[l][b]`` is one contiguous byte run (vLLM 0.32's CPU layout
``[num_blocks, num_kv_heads, block_size, 2*head_size]`` and FlashAttention's
``[num_blocks, block_size, num_kv_heads, 2*head_size]`` both qualify). Pages are treated as
bytes, whatever the dtype.

The packed form is block-major: block ``i`` of ``block_ids``, layer ``l`` lives at byte offset
``(i * num_layers + l) * page_bytes`` -- one stored object per vLLM block holding all layers.

CPU tensors go through a multi-threaded C++ copy (GIL released); CUDA tensors through one kernel
launch for all (block, layer) pages on the caller's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from membrain import _native

# Modes for CUDA gathers whose packed side is pinned host memory:
#   "mapped": the kernel writes straight into mapped pinned memory over PCIe;
#   "staged": the kernel gathers into a device scratch buffer, then one DMA copies it out;
#   "auto":   the default the benchmarks found faster ("staged" unless measured otherwise).
CUDA_MODES = ("auto", "mapped", "staged")


@dataclass(frozen=True)
class PagedKV:
    """Raw-memory description of a list of per-layer paged KV tensors."""

    layer_ptrs: list[int]
    num_blocks: int
    page_bytes: int
    block_stride: int
    device_type: str  # "cpu" or "cuda"
    device_index: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_ptrs)

    def packed_nbytes(self, n_blocks: int) -> int:
        """Bytes of the packed form of ``n_blocks`` blocks (all layers)."""
        return n_blocks * self.num_layers * self.page_bytes


@dataclass(frozen=True)
class _Buffer:
    ptr: int
    nbytes: int
    device_type: str
    device_index: int


def describe_kv_caches(kv_caches: Sequence[Any]) -> PagedKV:
    """Validates the layers and returns their raw layout.

    Raises ValueError when there are no layers, layers differ in shape, dtype, strides or
    device, or a page is not one contiguous byte run.
    """
    layers = list(kv_caches)
    if not layers:
        raise ValueError("kv_caches is empty: need at least one layer tensor")
    first = layers[0]
    _require_tensor(first, "kv_caches[0]")
    if first.dim() < 1:
        raise ValueError("kv_caches[0] is a scalar: dim 0 must be the block index")
    shape, dtype, strides, device = tuple(first.shape), first.dtype, tuple(first.stride()), first.device
    for i, layer in enumerate(layers[1:], start=1):
        _require_tensor(layer, f"kv_caches[{i}]")
        if tuple(layer.shape) != shape:
            raise ValueError(f"kv_caches[{i}] has shape {tuple(layer.shape)}, kv_caches[0] has {shape}")
        if layer.dtype != dtype:
            raise ValueError(f"kv_caches[{i}] has dtype {layer.dtype}, kv_caches[0] has {dtype}")
        if tuple(layer.stride()) != strides:
            raise ValueError(
                f"kv_caches[{i}] has strides {tuple(layer.stride())}, kv_caches[0] has {strides}"
            )
        if layer.device != device:
            raise ValueError(f"kv_caches[{i}] is on {layer.device}, kv_caches[0] is on {device}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"kv_caches live on {device}; only cpu and cuda tensors are supported")
    num_blocks = shape[0]
    if num_blocks <= 0:
        raise ValueError("kv_caches have no blocks (dim 0 is 0)")
    elem = first.element_size()
    # A page (one block of one layer) must be a dense C-contiguous run of bytes.
    expected = 1
    for dim in range(len(shape) - 1, 0, -1):
        if shape[dim] != 1 and strides[dim] != expected:
            raise ValueError(
                f"pages of kv_caches are not contiguous: dim {dim} has stride {strides[dim]}, "
                f"expected {expected} for shape {shape}"
            )
        expected *= shape[dim]
    page_bytes = expected * elem
    block_stride = strides[0] * elem
    if num_blocks > 1 and block_stride < page_bytes:
        raise ValueError(
            f"blocks of kv_caches overlap: block stride {block_stride} bytes < page size {page_bytes} bytes"
        )
    return PagedKV(
        layer_ptrs=[int(t.data_ptr()) for t in layers],
        num_blocks=num_blocks,
        page_bytes=page_bytes,
        block_stride=block_stride,
        device_type=device.type,
        device_index=device.index if device.index is not None else (0 if device.type == "cuda" else -1),
    )


def packed_nbytes(kv_caches: Sequence[Any], n_blocks: int) -> int:
    """Bytes needed to hold ``n_blocks`` packed blocks of ``kv_caches``."""
    return describe_kv_caches(kv_caches).packed_nbytes(n_blocks)


def gather_blocks(
    kv_caches: Sequence[Any] | PagedKV,
    block_ids: Any,
    out: Any,
    *,
    stream: Any = None,
    mode: str = "auto",
) -> None:
    """Copies the pages of ``block_ids`` (all layers) into the packed buffer ``out``.

    ``out`` is a contiguous tensor, numpy array or writable buffer (e.g. a HostPool Slot) of at
    least ``len(block_ids) * num_layers * page_bytes`` bytes. For CUDA caches it may be device
    memory or pinned host memory; ``stream`` is a torch.cuda.Stream or a raw cudaStream_t
    (default: torch's current stream). Raises IndexError for a bad block id and ValueError for
    a bad shape, size or device combination; nothing is written then.
    """
    kv = kv_caches if isinstance(kv_caches, PagedKV) else describe_kv_caches(kv_caches)
    ids = _block_ids(block_ids)
    buf = _buffer(out, "out", writable=True)
    _check_packed_size(kv, ids, buf, "out")
    if kv.device_type == "cpu":
        _require_host(buf, "out")
        _native.gather_cpu(
            kv.layer_ptrs, kv.num_blocks, kv.page_bytes, kv.block_stride, ids, buf.ptr, buf.nbytes
        )
        return
    _check_mode(mode)
    _check_cuda_buffer(kv, buf, "out")
    _native.gather_cuda(
        kv.layer_ptrs,
        kv.num_blocks,
        kv.page_bytes,
        kv.block_stride,
        ids,
        buf.ptr,
        buf.nbytes,
        kv.device_index,
        _stream_handle(stream, kv.device_index),
        mode,
    )


def scatter_blocks(
    src: Any,
    kv_caches: Sequence[Any] | PagedKV,
    block_ids: Any,
    *,
    stream: Any = None,
    mode: str = "auto",
) -> None:
    """The exact inverse of :func:`gather_blocks`: writes packed ``src`` into the pages of
    ``block_ids``. With duplicate ids the last occurrence wins."""
    kv = kv_caches if isinstance(kv_caches, PagedKV) else describe_kv_caches(kv_caches)
    ids = _block_ids(block_ids)
    buf = _buffer(src, "src", writable=False)
    _check_packed_size(kv, ids, buf, "src")
    if kv.device_type == "cpu":
        _require_host(buf, "src")
        _native.scatter_cpu(
            buf.ptr, buf.nbytes, kv.layer_ptrs, kv.num_blocks, kv.page_bytes, kv.block_stride, ids
        )
        return
    _check_mode(mode)
    _check_cuda_buffer(kv, buf, "src")
    _native.scatter_cuda(
        buf.ptr,
        buf.nbytes,
        kv.layer_ptrs,
        kv.num_blocks,
        kv.page_bytes,
        kv.block_stride,
        ids,
        kv.device_index,
        _stream_handle(stream, kv.device_index),
        mode,
    )


def set_num_threads(n: int) -> None:
    """Threads used by CPU gather/scatter (0 restores the default, min(cores, 8))."""
    if n < 0:
        raise ValueError(f"thread count must be >= 0, got {n}")
    _native.set_num_threads(n)


def get_num_threads() -> int:
    return int(_native.get_num_threads())


# --- helpers -----------------------------------------------------------------------------


def _require_tensor(t: Any, name: str) -> None:
    if not all(hasattr(t, a) for a in ("data_ptr", "stride", "element_size", "device", "dtype")):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _block_ids(block_ids: Any) -> np.ndarray:
    if hasattr(block_ids, "detach") and hasattr(block_ids, "cpu"):  # torch tensor, maybe on GPU
        if (
            block_ids.dtype.is_floating_point
            or block_ids.dtype.is_complex
            or str(block_ids.dtype) == "torch.bool"
        ):
            raise ValueError(f"block ids must be integers, got dtype {block_ids.dtype}")
        arr = block_ids.detach().cpu().numpy()
    else:
        arr = np.asarray(block_ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"block ids must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"block ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise IndexError(f"block id {int(arr.max())} is out of range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _buffer(obj: Any, name: str, *, writable: bool) -> _Buffer:
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):  # torch.Tensor
        if not obj.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        dev = obj.device
        return _Buffer(
            int(obj.data_ptr()),
            obj.numel() * obj.element_size(),
            dev.type,
            dev.index if dev.index is not None else (0 if dev.type == "cuda" else -1),
        )
    if isinstance(obj, np.ndarray):
        if not obj.flags["C_CONTIGUOUS"]:
            raise ValueError(f"{name} must be C-contiguous")
        if writable and not obj.flags["WRITEABLE"]:
            raise ValueError(f"{name} is read-only")
        return _Buffer(int(obj.ctypes.data), obj.nbytes, "cpu", -1)
    try:
        view = memoryview(obj)
    except TypeError:
        raise ValueError(
            f"{name} must be a tensor, numpy array or buffer, got {type(obj).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"{name} is read-only")
    arr = np.frombuffer(view.cast("B"), dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    return _Buffer(int(arr.ctypes.data) if view.nbytes else 0, view.nbytes, "cpu", -1)


def _check_packed_size(kv: PagedKV, ids: np.ndarray, buf: _Buffer, name: str) -> None:
    need = kv.packed_nbytes(len(ids))
    if buf.nbytes < need:
        raise ValueError(
            f"{name} holds {buf.nbytes} bytes but {len(ids)} blocks x {kv.num_layers} layers x "
            f"{kv.page_bytes} bytes = {need} are needed"
        )


def _require_host(buf: _Buffer, name: str) -> None:
    if buf.device_type != "cpu":
        raise ValueError(f"kv_caches are on the CPU but {name} is on {buf.device_type}:{buf.device_index}")


def _check_mode(mode: str) -> None:
    if mode not in CUDA_MODES:
        raise ValueError(f"mode must be one of {CUDA_MODES}, got {mode!r}")


def _check_cuda_buffer(kv: PagedKV, buf: _Buffer, name: str) -> None:
    if buf.device_type == "cuda" and buf.device_index != kv.device_index:
        raise ValueError(f"kv_caches are on cuda:{kv.device_index} but {name} is on cuda:{buf.device_index}")
    if buf.device_type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on {buf.device_type}; expected cuda or pinned host memory")
    if not hasattr(_native, "gather_cuda"):
        raise ValueError("kv_caches are CUDA tensors but this build of membrain._native has no CUDA kernels")


def _stream_handle(stream: Any, device_index: int) -> int:
    if stream is None:
        import torch  # only reached for CUDA tensors, where torch is present

        return int(torch.cuda.current_stream(device_index).cuda_stream)
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise ValueError(f"stream must be a torch.cuda.Stream or an int handle, got {type(stream).__name__}")
    return int(handle)
