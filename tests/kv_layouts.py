"""Paged-KV tensors built by vLLM 0.32's own code (membrain.bench.vllm_kv), filled with bytes,
for every KVCacheLayout; and the reference that reads them through their LOGICAL views.

Without vllm installed, tests that build caches skip with the reason.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from membrain.bench.vllm_kv import MLA_HEAD_SIZE, vllm_kv_caches

try:
    from membrain.bench.vllm_kv import layout_names

    LAYOUTS = layout_names()
    HAVE_VLLM = True
except ImportError:  # vLLM's six layouts, so parametrized tests still collect (and skip)
    LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
    HAVE_VLLM = False
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
HEAD_SIZES = (64, 80, 128, MLA_HEAD_SIZE)
BLOCK_SIZES = (16, 128)
KERNEL_RATIOS = (1, 2, 4)
POISON = 0xA5


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
    page_size_padded: int | None = None,
) -> list[torch.Tensor]:
    """vLLM's per-layer views of one group (vllm_kv_caches); random bytes, or every byte ``fill``."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed: the KV layouts are built with vLLM's create_kv_cache_views")
    raw, views = vllm_kv_caches(
        layout,
        num_layers,
        num_blocks,
        block_size,
        num_kv_heads,
        head_size,
        dtype,
        device=device,
        kernel_ratio=kernel_ratio,
        page_size_padded=page_size_padded,
    )
    if device != "meta":
        if fill is None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            data = torch.randint(0, 256, (raw.numel(),), dtype=torch.uint8, generator=gen)
        else:
            data = torch.full((raw.numel(),), fill, dtype=torch.uint8)
        raw.view(torch.uint8).copy_(data)
    return views


def layout_cases() -> list[tuple]:
    """Every (layout, kernel ratio) x every dtype, cycling head and block sizes so each layout
    meets each of them; a fixed order, so the sample is the same on every run."""
    cases = []
    sizes = list(itertools.product(HEAD_SIZES, BLOCK_SIZES))
    n = 0
    for layout, ratio in itertools.product(LAYOUTS, KERNEL_RATIOS):
        for dtype in DTYPES:
            head_size, block_size = sizes[n % len(sizes)]
            n += 3  # co-prime with len(sizes): every pair comes round for every layout
            cases.append((layout, ratio, dtype, head_size, block_size))
    return cases


# KVCacheLayout's properties, read from the name (L, B outermost pair) so this module imports
# without vllm; the tests themselves skip without it.
def block_outermost(layout: str) -> bool:
    return layout[0] == "B"


def block_compact(layout: str) -> bool:
    return set(layout[:2]) == {"L", "B"}


def case_id(value: object) -> str:
    """pytest id of one field of a layout_cases() tuple (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(value) if isinstance(value, int) else str(value).split(".")[-1]


def shape_for(layout: str, ratio: int, head_size: int) -> tuple[int, int]:
    """(num_layers, num_kv_heads) vLLM accepts: splitting a KV block into kernel blocks needs
    dense block pages, so one layer for block-outermost layouts and one head where a page is
    per-head runs (vLLM raises otherwise; test_vllm_refuses_kernel_split_of_sparse_pages)."""
    layers = 3
    heads = 1 if head_size == MLA_HEAD_SIZE else 2
    if ratio > 1:
        if block_outermost(layout):
            layers = 1
        if not block_compact(layout):
            heads = 1
    return layers, heads


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
    """Packed block-major bytes from the logical views: KV block, then layer, then the KV block's
    whole page -- its kernel blocks joined along N into one [H, N, C] view -- in ``page_order``.
    So packed bytes do not depend on how a backend splits a KV block into kernel blocks."""
    parts = []
    for b in block_ids:
        for layer in kv_caches:
            rows = [layer[b * kernel_ratio + j] for j in range(kernel_ratio)]
            page = torch.cat(rows, dim=1) if rows[0].dim() == 3 else torch.cat(rows)
            parts.append(page_bytes_of(page, page_order))
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (random bytes include NaN patterns, which torch.equal calls unequal)."""
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8).cpu(), b.contiguous().reshape(-1).view(torch.uint8).cpu()
    )
