"""Gather/scatter of paged KV blocks between vLLM's KV cache and packed buffers.

``kv_caches`` is a sequence of per-layer tensors as vLLM 0.32 creates them
(``vllm.v1.kv_cache_interface.create_kv_cache_views``): logical ``[B, H, N, C]`` views (blocks,
KV heads, tokens, content: K and V of one token-head in dtype elements) whose *physical* order
follows the group's ``KVCacheLayout``:

  ========  ==============================  ===========================  ==========
  layout    page of one block in one layer  moved as                     page_order
  ========  ==============================  ===========================  ==========
  LBHNC     one run                         one run per page             HNC
  LBNHC     one run (CUDA default)          one run per page             NHC
  BLHNC     one run; a block of all layers  one run per block (adjacent  HNC
            is one run too                  block ids: one run)
  BLNHC     as BLHNC                        as BLHNC                     NHC
  LHBNC     num_kv_heads runs               num_kv_heads runs per page   HNC
  BHLNC     num_kv_heads runs               num_kv_heads runs per page   HNC
  ========  ==============================  ===========================  ==========

When vLLM splits a KV block into ``ratio`` kernel blocks, dim 0 is ``num_blocks * ratio``: pass
``num_blocks`` and KV block ``b`` is kernel rows ``b*ratio .. b*ratio+ratio-1`` (block ids are
always KV block ids). Tensors of another rank are accepted when each page ``t[b]`` is one
C-contiguous byte run. Pages are treated as bytes, whatever the dtype.

The packed form is block-major: block ``i`` of ``block_ids``, layer ``l`` lives at byte offset
``(i * num_layers + l) * page_bytes`` -- one stored object per vLLM block holding all layers.
Inside a page the bytes are the KV block's whole logical page in one of two orders, never
transposed at the granularity of a token-head. ``PagedKV.page_order`` says which: ``"HNC"``
means a packed page equals the KV block's ``[H, N, C]`` view made contiguous, ``"NHC"`` its
``[N, H, C]`` permutation. Kernel-block splitting does not change the packed bytes (a split HNC
page is packed heads outer, kernel blocks inner, in runs of one head's tokens of one kernel
block; split NHC pages are already back to back), so the key needs no kernel block size. Why
not one canonical order: moving whole runs keeps the copy at memcpy speed, while transposing at
the granularity of C (256-1152 bytes) would cost a large share of the bandwidth of a 2-core
host; a fleet normally runs one attention backend, and two page orders (not six layouts) split
the key space -- so the connector puts ``page_order`` into its keys.

CPU tensors go through a multi-threaded C++ copy (GIL released); CUDA tensors through one kernel
launch for all (block, layer, run) triples on the caller's stream. The scheduler process, which
has no tensors, runs the same validation with :func:`describe_layer_views` on the shapes and
strides vLLM would create.
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
    """Raw-memory description of a list of per-layer paged KV tensors (see the module docstring).

    The page of KV block ``b`` in layer ``l`` is the byte runs
    ``layer_ptrs[l] + b*block_stride + j*sub_stride + h*run_stride`` (``j < sub_count``,
    ``h < run_count``), each ``run_bytes`` long, already merged into the fewest runs.
    """

    layer_ptrs: list[int]
    num_blocks: int  # KV blocks (block ids are < num_blocks)
    page_bytes: int  # one KV block of one layer: sub_count * run_count * run_bytes
    block_stride: int
    device_type: str  # "cpu", "cuda" (or "meta": description only, nothing can be copied)
    device_index: int
    sub_count: int = 1
    sub_stride: int = 0
    run_count: int = 1
    run_stride: int = 0
    kernel_ratio: int = 1  # kernel blocks per KV block (dim 0 of the views / num_blocks)
    kernel_block_size: int | None = None  # N of the [B, H, N, C] views; None for other ranks
    page_order: str = "HNC"  # "HNC" or "NHC": order of a packed page's bytes
    block_is_one_run: bool = False  # a block of all layers is one run (BLHNC, BLNHC)

    @property
    def num_layers(self) -> int:
        return len(self.layer_ptrs)

    @property
    def run_bytes(self) -> int:
        return self.page_bytes // (self.sub_count * self.run_count)

    def packed_nbytes(self, n_blocks: int) -> int:
        """Bytes of the packed form of ``n_blocks`` blocks (all layers)."""
        return n_blocks * self.num_layers * self.page_bytes

    def _run_args(self) -> dict[str, int]:
        return {
            "sub_count": self.sub_count,
            "sub_stride": self.sub_stride,
            "run_count": self.run_count,
            "run_stride": self.run_stride,
        }


@dataclass(frozen=True)
class _Buffer:
    ptr: int
    nbytes: int
    device_type: str
    device_index: int


def describe_kv_caches(kv_caches: Sequence[Any], num_blocks: int | None = None) -> PagedKV:
    """Validates the layers and returns their raw layout.

    ``num_blocks`` is the number of KV blocks (vLLM's ``kv_cache_config.num_blocks``); when dim 0
    of the views is ``num_blocks * ratio``, each KV block is ``ratio`` kernel blocks. Without it,
    dim 0 counts KV blocks. CPU and CUDA tensors can be copied; meta tensors (vLLM's views
    built on ``device="meta"``) are described from their storage offsets, for validation only.

    Raises ValueError when there are no layers, layers differ in shape, dtype, strides or
    device, dim 0 is not a multiple of ``num_blocks``, or the pages are not a layout this
    module can move (see :func:`describe_layer_views`).
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
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"kv_caches live on {device}; only cpu and cuda tensors are supported")
    elem = first.element_size()
    if device.type == "meta":  # no memory: the storage offset is the layer's place in the buffer
        ptrs = [int(t.storage_offset()) * elem for t in layers]
    else:
        ptrs = [int(t.data_ptr()) for t in layers]
    return describe_layer_views(
        shape,
        tuple(s * elem for s in strides),
        ptrs,
        elem,
        device_type=device.type,
        device_index=device.index if device.index is not None else (0 if device.type == "cuda" else -1),
        num_blocks=num_blocks,
    )


def describe_layer_views(
    shape: Sequence[int],
    byte_strides: Sequence[int],
    layer_ptrs: Sequence[int],
    elem_size: int,
    *,
    device_type: str = "cpu",
    device_index: int = -1,
    num_blocks: int | None = None,
) -> PagedKV:
    """The validation and description of :func:`describe_kv_caches`, from numbers only.

    ``shape``/``byte_strides``: one layer's view (all layers alike), strides in bytes;
    ``layer_ptrs``: each layer's address of element 0 -- or, where there is no memory (the
    scheduler), its byte offset in the KV buffer (``KVCacheTensor.offset + l * layer_stride``);
    ``elem_size``: bytes per dtype element. The run description is checked by the same native
    code that gather/scatter run (no overlapping runs, counts and strides consistent), so a
    description accepted here is accepted by the copies. Raises ValueError naming the bad value.
    """
    shape = tuple(int(d) for d in shape)
    strides = tuple(int(s) for s in byte_strides)
    if len(shape) < 1:
        raise ValueError("kv_caches view is a scalar: dim 0 must be the block index")
    if len(strides) != len(shape):
        raise ValueError(f"{len(strides)} strides given for a view of shape {shape}")
    if elem_size <= 0:
        raise ValueError(f"element size must be positive, got {elem_size}")
    dim0 = shape[0]
    if dim0 <= 0:
        raise ValueError("kv_caches have no blocks (dim 0 is 0)")
    if num_blocks is None:
        num_blocks = dim0
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    if dim0 % num_blocks:
        raise ValueError(
            f"dim 0 of kv_caches is {dim0}, not a multiple of num_blocks={num_blocks} "
            "(kernel blocks must split every KV block evenly)"
        )
    ratio = dim0 // num_blocks
    if len(shape) == 4:
        page_order, run_count, run_stride, run_bytes = _bhnc_page_runs(shape, strides, elem_size)
        kernel_block_size: int | None = shape[2]
    else:
        page_order, run_count, run_stride = "HNC", 1, 0
        run_bytes = _contiguous_page_bytes(shape, strides, elem_size)
        kernel_block_size = None
    # Two nested levels of runs, outer first: kernel blocks, then heads.
    sub_count, sub_stride = ratio, strides[0] if ratio > 1 else 0
    heads = shape[1] if len(shape) == 4 else 1
    if ratio > 1 and page_order == "HNC" and heads > 1:
        # Packed bytes do not depend on the kernel split: an HNC page is packed as the whole KV
        # block's [H, N, C], i.e. heads outer and kernel blocks inner (runs of one head's tokens
        # of one kernel block). Split NHC pages are already [N, H, C] once concatenated.
        sub_count, sub_stride = heads, strides[1]
        run_count, run_stride, run_bytes = ratio, strides[0], shape[2] * shape[3] * elem_size
    try:
        merged = _native.describe_paged_layout(
            [int(p) for p in layer_ptrs],
            num_blocks,
            sub_count * run_count * run_bytes,
            ratio * strides[0],
            sub_count=sub_count,
            sub_stride=sub_stride,
            run_count=run_count,
            run_stride=run_stride,
        )
    except (ValueError, OverflowError, TypeError) as e:
        raise ValueError(f"kv_caches of shape {shape}, byte strides {strides}: {e}") from None
    return PagedKV(
        layer_ptrs=[int(p) for p in layer_ptrs],
        num_blocks=num_blocks,
        page_bytes=sub_count * run_count * run_bytes,
        block_stride=ratio * strides[0],
        device_type=device_type,
        device_index=device_index,
        sub_count=merged["sub_count"],
        sub_stride=merged["sub_stride"],
        run_count=merged["run_count"],
        run_stride=merged["run_stride"],
        kernel_ratio=ratio,
        kernel_block_size=kernel_block_size,
        page_order=page_order,
        block_is_one_run=bool(merged["block_is_one_run"]),
    )


def _bhnc_page_runs(shape: tuple[int, ...], strides: tuple[int, ...], elem: int) -> tuple[str, int, int, int]:
    """(page_order, run_count, run_stride, run_bytes) of one kernel block of a [B, H, N, C] view.

    A page whose [H, N, C] or [N, H, C] bytes are dense is one run; otherwise (LHBNC, BHLNC)
    each head's [N, C] must be dense and the page is one run per head. With H or N of one, both
    orders are the same bytes: reported as "HNC" so such caches share keys across layouts.
    """
    _, heads, tokens, content = shape
    _, s_head, s_token, s_content = strides
    if content > 1 and s_content != elem:
        raise ValueError(
            f"pages of kv_caches are not contiguous: dim 3 (content) has byte stride {s_content}, "
            f"expected the element size {elem} for shape {shape}"
        )
    cell = content * elem  # one token-head: K and V together
    token_dense = tokens == 1 or s_token == cell
    if token_dense and (heads == 1 or s_head == tokens * cell):
        return "HNC", 1, 0, heads * tokens * cell
    if (heads == 1 or s_head == cell) and (tokens == 1 or s_token == heads * cell):
        return "NHC", 1, 0, heads * tokens * cell
    if token_dense:
        return "HNC", heads, s_head, tokens * cell
    raise ValueError(
        f"pages of kv_caches are not contiguous: byte strides {strides} of shape {shape} are not "
        "one of vLLM's KV cache layouts (a head's tokens must be dense)"
    )


def _contiguous_page_bytes(shape: tuple[int, ...], strides: tuple[int, ...], elem: int) -> int:
    """Bytes of a page ``t[b]`` that must be one C-contiguous run (views of rank other than 4)."""
    expected = elem
    for dim in range(len(shape) - 1, 0, -1):
        if shape[dim] != 1 and strides[dim] != expected:
            raise ValueError(
                f"pages of kv_caches are not contiguous: dim {dim} has byte stride {strides[dim]}, "
                f"expected {expected} for shape {shape}"
            )
        expected *= shape[dim]
    return expected


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
    threads: int = 0,
) -> None:
    """Copies the pages of ``block_ids`` (all layers) into the packed buffer ``out``.

    ``out`` is a contiguous tensor, numpy array or writable buffer (e.g. a HostPool Slot) of at
    least ``len(block_ids) * num_layers * page_bytes`` bytes. For CUDA caches it may be device
    memory or pinned host memory; ``stream`` is a torch.cuda.Stream or a raw cudaStream_t
    (default: torch's current stream). Raises IndexError for a bad block id and ValueError for
    a bad shape, size or device combination; nothing is written then. CPU caches: ``threads``
    caps the copy threads (0: the process-wide copy pool, see :func:`set_num_threads`); 1 copies
    on the calling thread alone, at its priority, never waiting for the pool.
    """
    kv = kv_caches if isinstance(kv_caches, PagedKV) else describe_kv_caches(kv_caches)
    ids = _block_ids(block_ids)
    buf = _buffer(out, "out", writable=True)
    _check_packed_size(kv, ids, buf, "out")
    _require_memory(kv)
    if kv.device_type == "cpu":
        _require_host(buf, "out")
        _native.gather_cpu(
            kv.layer_ptrs,
            kv.num_blocks,
            kv.page_bytes,
            kv.block_stride,
            ids,
            buf.ptr,
            buf.nbytes,
            **kv._run_args(),
            max_threads=threads,
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
        **kv._run_args(),
    )


def scatter_blocks(
    src: Any,
    kv_caches: Sequence[Any] | PagedKV,
    block_ids: Any,
    *,
    stream: Any = None,
    mode: str = "auto",
    threads: int = 0,
) -> None:
    """The exact inverse of :func:`gather_blocks`: writes packed ``src`` into the pages of
    ``block_ids``. With duplicate ids the last occurrence wins."""
    kv = kv_caches if isinstance(kv_caches, PagedKV) else describe_kv_caches(kv_caches)
    ids = _block_ids(block_ids)
    buf = _buffer(src, "src", writable=False)
    _check_packed_size(kv, ids, buf, "src")
    _require_memory(kv)
    if kv.device_type == "cpu":
        _require_host(buf, "src")
        _native.scatter_cpu(
            buf.ptr,
            buf.nbytes,
            kv.layer_ptrs,
            kv.num_blocks,
            kv.page_bytes,
            kv.block_stride,
            ids,
            **kv._run_args(),
            max_threads=threads,
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
        **kv._run_args(),
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


def _require_memory(kv: PagedKV) -> None:
    if kv.device_type == "meta":
        raise ValueError("kv_caches are meta tensors: they describe a layout but hold no bytes to copy")


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
