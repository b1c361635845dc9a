"""Paged-KV tensors shaped like vLLM 0.32's per-layer views, filled with random bytes.

Both layouts the connector meets: the CPU attention backend's
[num_blocks, num_kv_heads, block_size, 2*head_size] and FlashAttention's
[num_blocks, block_size, num_kv_heads, 2*head_size]. Tensors are views of one backing buffer
per layer group, like vLLM's, so block strides are real strides rather than an accident of
allocation.
"""

from __future__ import annotations

import torch

LAYOUTS = ("cpu_attn", "flash_attn")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.uint8)


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
) -> list[torch.Tensor]:
    if layout == "cpu_attn":
        shape = (num_blocks, num_kv_heads, block_size, 2 * head_size)
    elif layout == "flash_attn":
        shape = (num_blocks, block_size, num_kv_heads, 2 * head_size)
    else:
        raise ValueError(layout)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    elems = num_blocks * num_kv_heads * block_size * 2 * head_size
    elem = torch.empty((), dtype=dtype).element_size()
    # One int8 backing buffer for all layers, each layer a dtype view (as in vLLM 0.32).
    backing = torch.randint(0, 256, (num_layers * elems * elem,), dtype=torch.uint8, generator=gen)
    backing = backing.to(device)
    layers = []
    for l in range(num_layers):
        chunk = backing[l * elems * elem : (l + 1) * elems * elem]
        layers.append(chunk.view(dtype).view(shape))
    return layers


def reference_gather(kv_caches: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """Packed block-major bytes computed the slow, obvious way."""
    parts = []
    for b in block_ids:
        for layer in kv_caches:
            parts.append(layer[b].contiguous().reshape(-1).view(torch.uint8).cpu())
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes include NaN patterns, which torch.equal calls unequal)."""
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8).cpu(), b.contiguous().reshape(-1).view(torch.uint8).cpu()
    )
