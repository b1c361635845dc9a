"""vLLM 0.32's own KV cache, for benchmarks and tests: the one builder of vLLM-shaped KV.

:func:`build_vllm_kv` runs what vLLM runs: ``get_kv_cache_config_from_groups`` (the engine core's
``KVCacheConfig`` for a layout: ``KVCacheTensor`` strides from ``compute_layout_strides``, block-
outermost interleaving, padded pages) and the worker's ``allocate_kv_cache`` (per-layer strided
``[B, H, N, C]`` views from ``create_kv_cache_views``, split into kernel blocks when asked), for a
real ``FullAttentionSpec`` or, for head size 576, ``MLAAttentionSpec``. Hand-made contiguous
tensors would hide exactly the strides that matter. The small ``vllm_config`` stand-in carries
only what those functions and the connector read. Needs vllm importable (CPU or CUDA build).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace as NS
from typing import Any

MLA_HEAD_SIZE = 576  # DeepSeek-style MLA: one latent "head" of 576, no separate V


def layout_names() -> tuple[str, ...]:
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return tuple(layout.name for layout in KVCacheLayout)


@dataclass
class VllmKV:
    vllm_config: Any
    kv_cache_config: Any
    kv_caches: dict[str, Any]
    backing: Any  # every byte of the allocation, as one uint8 tensor

    @property
    def layers(self) -> list[Any]:
        return [self.kv_caches[n] for n in self.kv_cache_config.kv_cache_groups[0].layer_names]

    def block(self, b: int) -> list[Any]:
        """KV block ``b`` of every layer through the logical views (all its kernel rows)."""
        ratio = self.layers[0].shape[0] // self.kv_cache_config.num_blocks
        return [t[b * ratio : (b + 1) * ratio].clone() for t in self.layers]


def vllm_config(
    layout: str,
    block_size: int,
    extra: dict[str, Any] | None = None,
    model: str = "m",
    num_blocks: int | None = None,
) -> Any:
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return NS(
        kv_transfer_config=NS(
            kv_connector_extra_config=dict(extra or {}),
            is_kv_producer=True,
            kv_load_failure_policy="fail",
        ),
        cache_config=NS(
            block_size=block_size,
            cache_dtype="auto",
            prefix_caching_hash_algo="sha256",
            kv_cache_layout=layout,
            get_resolved_kv_cache_layout=lambda: KVCacheLayout[layout],
            num_gpu_blocks_override=num_blocks,
            prefix_cache_retention_interval=None,
        ),
        model_config=NS(
            model=model,
            revision=None,
            dtype="bfloat16",
            hf_config=NS(to_json_string=lambda use_diff=False: "{}"),
        ),
        parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1),
        attention_config=NS(backend=None, hisparse_config=None),
        kv_events_config=NS(enable_kv_cache_events=True),
    )


def build_vllm_kv(
    layout: str = "LBHNC",
    *,
    num_layers: int = 2,
    num_blocks: int = 32,
    block_size: int = 16,
    num_kv_heads: int = 2,
    head_size: int = 64,
    dtype: Any = None,
    kernel_block_size: int | None = None,
    mla: bool | None = None,
    page_size_padded: int | None = None,
    device: str = "cpu",
    extra: dict[str, Any] | None = None,
    seed: int | None = 0,
    first_layer: int = 0,
) -> VllmKV:
    """The KV cache vLLM builds for one group of ``num_layers`` layers. ``mla`` defaults to
    ``head_size == 576``; ``seed`` None leaves the (zeroed) allocation as it is, else it is
    filled with random bytes; ``device="meta"`` allocates nothing (what a scheduler can build).
    Layers are named ``model.layers.{i}.self_attn`` from ``first_layer`` on (a PP stage's)."""
    import torch
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MLAAttentionSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    dtype = torch.bfloat16 if dtype is None else dtype
    if head_size == MLA_HEAD_SIZE if mla is None else mla:
        spec: Any = MLAAttentionSpec(
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
    names = [f"model.layers.{i}.self_attn" for i in range(first_layer, first_layer + num_layers)]
    cfg = vllm_config(layout, block_size, extra, num_blocks=num_blocks)
    kvc = get_kv_cache_config_from_groups(
        cfg,
        [KVCacheGroupSpec(layer_names=names, kv_cache_spec=spec)],
        spec.page_size_bytes * num_layers * num_blocks,
    )
    caches = allocate_kv_cache(
        kvc,
        torch.device(device),
        KVCacheLayout[layout],
        kernel_block_sizes=[kernel_block_size] if kernel_block_size else None,
    )
    first = caches[names[0]]
    backing = torch.empty(0, dtype=torch.uint8, device=first.device).set_(first.untyped_storage())
    if seed is not None and device != "meta":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        backing.copy_(torch.randint(0, 256, backing.shape, dtype=torch.uint8, generator=gen))
    return VllmKV(cfg, kvc, caches, backing)


def build_hybrid_vllm_kv(
    layout: str = "LBHNC",
    *,
    layers_per_group: int = 2,
    num_blocks: int = 64,
    block_size: int = 16,
    sliding_window: int = 32,
    num_kv_heads: int = 2,
    head_size: int = 64,
    dtype: Any = None,
    extra: dict[str, Any] | None = None,
    seed: int | None = 0,
) -> VllmKV:
    """The KV cache vLLM builds for a Gemma-3-style hybrid model with its hybrid KV-cache
    manager on: group 0 of ``layers_per_group`` full-attention layers, group 1 of as many
    sliding-window layers (``SlidingWindowSpec``), through ``get_kv_cache_config_from_groups``
    (the groups alias one allocation from byte 0 and share one block pool: a block id names a
    page of its own group's layers only) and the worker's ``allocate_kv_cache``."""
    import torch
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, SlidingWindowSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    dtype = torch.bfloat16 if dtype is None else dtype
    common = {"block_size": block_size, "num_kv_heads": num_kv_heads, "head_size": head_size, "dtype": dtype}
    full = FullAttentionSpec(**common)
    sw = SlidingWindowSpec(**common, sliding_window=sliding_window)
    n = layers_per_group
    groups = [
        KVCacheGroupSpec(
            layer_names=[f"model.layers.{2 * i}.self_attn" for i in range(n)], kv_cache_spec=full
        ),
        KVCacheGroupSpec(
            layer_names=[f"model.layers.{2 * i + 1}.self_attn" for i in range(n)], kv_cache_spec=sw
        ),
    ]
    cfg = vllm_config(layout, block_size, extra, num_blocks=num_blocks)
    kvc = get_kv_cache_config_from_groups(cfg, groups, full.page_size_bytes * n * num_blocks)
    caches = allocate_kv_cache(kvc, torch.device("cpu"), KVCacheLayout[layout])
    first = caches[groups[0].layer_names[0]]
    backing = torch.empty(0, dtype=torch.uint8, device=first.device).set_(first.untyped_storage())
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        backing.copy_(torch.randint(0, 256, backing.shape, dtype=torch.uint8, generator=gen))
    return VllmKV(cfg, kvc, caches, backing)


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
    """(backing int8 buffer, per-layer views) of :func:`build_vllm_kv`, unfilled: with
    ``kernel_ratio`` > 1 dim 0 is ``num_blocks * kernel_ratio`` kernel blocks; vLLM raises
    ValueError where the layout does not store blocks as dense pages."""
    import torch

    kv = build_vllm_kv(
        layout,
        num_layers=num_layers,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        dtype=dtype,
        kernel_block_size=block_size // kernel_ratio if kernel_ratio > 1 else None,
        page_size_padded=page_size_padded,
        device=device,
        seed=None,
    )
    return kv.backing.view(torch.int8), kv.layers


def same_bytes(a: list[Any], b: list[Any]) -> bool:
    """Bitwise equality (random bytes include NaN patterns, which torch.equal calls unequal)."""
    import torch

    return all(
        torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)) for x, y in zip(a, b)
    )
