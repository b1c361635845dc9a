"""The KV cache vLLM 0.32 hands a connector, built by vLLM's own functions (not a test module).

``make_vllm_kv(layout, ...)`` runs ``get_kv_cache_config_from_groups`` (the engine core's
KVCacheConfig for a layout) and ``allocate_kv_cache`` (the worker's per-layer strided views,
with kernel-block splitting when ``kernel_block_size`` is given), then fills the backing buffer
with random bytes. The small ``vllm_config`` stand-in carries only what those functions and the
connector read; everything about the tensors is vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace as NS
from typing import Any

import torch

LAYOUTS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


@dataclass
class VllmKV:
    vllm_config: Any
    kv_cache_config: Any
    kv_caches: dict[str, torch.Tensor]
    backing: torch.Tensor  # every byte of the allocation, as uint8

    @property
    def layers(self) -> list[torch.Tensor]:
        return [self.kv_caches[n] for n in self.kv_cache_config.kv_cache_groups[0].layer_names]

    def block(self, b: int) -> list[torch.Tensor]:
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


def make_vllm_kv(
    layout: str = "LBHNC",
    *,
    num_layers: int = 2,
    num_blocks: int = 32,
    block_size: int = 16,
    num_kv_heads: int = 2,
    head_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    kernel_block_size: int | None = None,
    mla: bool = False,
    device: str = "cpu",
    extra: dict[str, Any] | None = None,
    seed: int = 0,
) -> VllmKV:
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MLAAttentionSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    if mla:
        spec: Any = MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=dtype)
    else:
        spec = FullAttentionSpec(
            block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype
        )
    names = [f"model.layers.{i}.self_attn" for i in range(num_layers)]
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
    gen = torch.Generator(device="cpu").manual_seed(seed)
    backing.copy_(torch.randint(0, 256, backing.shape, dtype=torch.uint8, generator=gen))
    return VllmKV(cfg, kvc, caches, backing)


def same_bytes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equality (random bytes include NaN patterns, which torch.equal calls unequal)."""
    return all(
        torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)) for x, y in zip(a, b)
    )
