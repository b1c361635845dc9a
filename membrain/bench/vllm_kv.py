"""vLLM 0.32's own per-layer KV cache views, for benchmarks and tests.

``vllm_kv_caches`` does for one KV cache group what vLLM's ``get_kv_cache_config_from_groups``
and the worker's ``allocate_kv_cache`` do: a real ``KVCacheSpec`` (FullAttentionSpec, or
MLAAttentionSpec for head size 576), the ``KVCacheTensor`` strides from
``compute_layout_strides``, and the views from ``create_kv_cache_views`` over one int8 buffer,
optionally split into kernel blocks. Hand-made contiguous tensors would hide exactly the strides
that matter. Needs vllm (CPU or CUDA build) importable; raises ImportError otherwise.
"""

from __future__ import annotations

from typing import Any

MLA_HEAD_SIZE = 576  # DeepSeek-style MLA: one latent "head" of 576, no separate V


def layout_names() -> tuple[str, ...]:
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return tuple(layout.name for layout in KVCacheLayout)


def vllm_kv_caches(
    layout: str,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: Any,
    *,
    device: str = "cpu",
    kernel_ratio: int = 1,
    page_size_padded: int | None = None,
) -> tuple[Any, list[Any]]:
    """(backing int8 buffer, per-layer [B, H, N, C] views) as vLLM's worker would create them.

    The buffer is uninitialised (fill it through the returned tensor); on ``device="meta"`` it has
    no memory at all -- what the scheduler can build. With ``kernel_ratio`` > 1, dim 0 is
    ``num_blocks * kernel_ratio`` kernel blocks of ``block_size // kernel_ratio`` tokens; vLLM
    raises ValueError where the layout does not store blocks as dense pages. ``page_size_padded``
    pads every page to that many bytes (as hybrid models do to align page sizes).
    """
    import torch
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        MLAAttentionSpec,
        compute_layout_strides,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    kv_layout = KVCacheLayout[layout]
    if head_size == MLA_HEAD_SIZE:
        spec = MLAAttentionSpec(
            block_size=block_size,
            num_kv_heads=1,
            head_size=head_size,
            dtype=dtype,
            page_size_padded=page_size_padded,
        )
    else:
        spec = FullAttentionSpec(
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            dtype=dtype,
            page_size_padded=page_size_padded,
        )
    bytes_per_block = num_layers * spec.page_size_bytes  # padded, when padding is asked for
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
    raw = torch.empty((size,), dtype=torch.int8, device=device)
    kernel_block_size = block_size // kernel_ratio if kernel_ratio > 1 else None
    views = create_kv_cache_views(
        raw, spec, num_blocks, kv_layout, tensor, kernel_block_size=kernel_block_size
    )
    return raw, views
