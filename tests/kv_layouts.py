"""Paged-KV tensors built by vLLM 0.32's own code, for every KVCacheLayout, filled with bytes.

``make_kv_caches`` does for one KV cache group what vLLM's ``get_kv_cache_config_from_groups``
and the worker's ``allocate_kv_cache`` do: a real ``KVCacheSpec`` (FullAttentionSpec, or
MLAAttentionSpec for head size 576), the ``KVCacheTensor`` strides from
``compute_layout_strides``, and the per-layer views from ``create_kv_cache_views`` over one int8
buffer -- optionally split into kernel blocks. Never hand-made contiguous tensors: their
strides would hide exactly the layouts that matter.

``reference_gather`` computes the packed bytes from the LOGICAL views, the slow, obvious way.
"""

from __future__ import annotations

import torch
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheTensor,
    MLAAttentionSpec,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

LAYOUTS = tuple(layout.name for layout in KVCacheLayout)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
HEAD_SIZES = (64, 80, 128, 576)  # 576: MLA (one latent "head", no separate V)
BLOCK_SIZES = (16, 128)
KERNEL_RATIOS = (1, 2, 4)
MLA_HEAD_SIZE = 576
POISON = 0xA5


def make_spec(block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype):
    if head_size == MLA_HEAD_SIZE:
        return MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=dtype)
    return FullAttentionSpec(
        block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype
    )


def make_kv_caches(
    layout: str,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
    kernel_ratio: int = 1,
    fill: int | None = None,
) -> list[torch.Tensor]:
    """vLLM's per-layer views of one group; random bytes, or every byte ``fill``.

    With ``kernel_ratio`` > 1, dim 0 is ``num_blocks * kernel_ratio`` kernel blocks of
    ``block_size // kernel_ratio`` tokens; vLLM raises ValueError where the layout does not store
    blocks as dense pages (block-outermost with several layers, LHBNC/BHLNC with several heads).
    """
    kv_layout = KVCacheLayout[layout]
    spec = make_spec(block_size, num_kv_heads, head_size, dtype)
    page = spec.page_size_bytes
    bytes_per_block = num_layers * page
    # As get_kv_cache_config_from_groups: block-outermost layouts interleave the layers' pages.
    fixed_block_stride = bytes_per_block if kv_layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, num_blocks, num_layers, kv_layout, fixed_strides=(None, fixed_block_stride, None, None, None)
    )
    size = bytes_per_block * num_blocks
    tensor = KVCacheTensor(
        size=size,
        layers=[f"model.layers.{l}.attn" for l in range(num_layers)],
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    if device == "meta":  # what the scheduler can build: shapes and strides, no memory
        raw = torch.empty((size,), dtype=torch.uint8, device="meta")
    elif fill is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        raw = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)
    else:
        raw = torch.full((size,), fill, dtype=torch.uint8)
    raw = raw.view(torch.int8).to(device)  # vLLM's backing buffer is int8
    kernel_block_size = block_size // kernel_ratio if kernel_ratio > 1 else None
    return create_kv_cache_views(
        raw, spec, num_blocks, kv_layout, tensor, kernel_block_size=kernel_block_size
    )


def expected_page_order(layout: str, num_kv_heads: int, tokens_per_kernel_block: int) -> str:
    """NHC for the layouts that store tokens outside heads; HNC otherwise, and whenever H or N
    is one (both orders are then the same bytes)."""
    if num_kv_heads == 1 or tokens_per_kernel_block == 1:
        return "HNC"
    return "NHC" if layout in ("LBNHC", "BLNHC") else "HNC"


def page_bytes_of(view: torch.Tensor, page_order: str) -> torch.Tensor:
    """One kernel block's [H, N, C] logical view as packed bytes in ``page_order``."""
    if view.dim() == 3 and page_order == "NHC":
        view = view.permute(1, 0, 2)
    return view.contiguous().reshape(-1).view(torch.uint8).cpu()


def reference_gather(
    kv_caches: list[torch.Tensor], block_ids: list[int], page_order: str = "HNC", kernel_ratio: int = 1
) -> torch.Tensor:
    """Packed block-major bytes: KV block, then layer, then kernel block, from the logical views."""
    parts = []
    for b in block_ids:
        for layer in kv_caches:
            for j in range(kernel_ratio):
                parts.append(page_bytes_of(layer[b * kernel_ratio + j], page_order))
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes include NaN patterns, which torch.equal calls unequal)."""
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8).cpu(), b.contiguous().reshape(-1).view(torch.uint8).cpu()
    )
