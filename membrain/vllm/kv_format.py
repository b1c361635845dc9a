"""Can Membrain move this KV cache? One answer for the scheduler and the workers.

Workers describe the per-layer tensors vLLM registers (:func:`describe_worker_caches`). The
scheduler has no tensors, only ``kv_cache_config`` and the resolved layout; it builds the very
views a worker will get with vLLM's own ``create_kv_cache_views`` over a ``meta`` buffer (no
memory) and runs the same description on them (:func:`unsupported_reason`). So a layout the
workers would refuse is refused at start-up, and the scheduler never promises tokens for it.
(The kernel block size is chosen inside the workers; it only reshapes dim 0 and is handled
there.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from membrain import ops


def _groups(kv_cache_config: Any) -> list[Any]:
    return list(getattr(kv_cache_config, "kv_cache_groups", None) or [])


def block_bytes(kv_cache_config: Any) -> int:
    """Bytes of one KV block, all layers of the (single) group."""
    g = _groups(kv_cache_config)[0]
    return int(g.kv_cache_spec.page_size_bytes) * len(g.layer_names)


def describe_worker_caches(
    kv_caches: Mapping[str, Any], layer_names: Sequence[str], num_blocks: int | None
) -> ops.PagedKV:
    """The worker's description of its registered tensors (raises ValueError naming the
    problem when Membrain cannot move them)."""
    missing = [n for n in layer_names if n not in kv_caches]
    if missing:
        raise ValueError(f"vLLM registered no KV tensor for layers {missing[:4]}")
    return ops.describe_kv_caches([kv_caches[n] for n in layer_names], num_blocks=num_blocks)


def _meta_views(vllm_config: Any, kv_cache_config: Any) -> list[Any]:
    """The group's per-layer views as a worker will build them, over a meta buffer."""
    import torch
    from vllm.v1.kv_cache_interface import create_kv_cache_views

    layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
    group = _groups(kv_cache_config)[0]
    spec = group.kv_cache_spec
    names = list(group.layer_names)
    views: dict[str, Any] = {}
    size = max(int(t.size) for t in kv_cache_config.kv_cache_tensors)
    buf = torch.empty(size, dtype=torch.int8, device="meta")
    for tensor in kv_cache_config.kv_cache_tensors:
        if not set(tensor.layers) & set(names):
            continue
        num_blocks = kv_cache_config.num_blocks_of(tensor)
        views.update(zip(tensor.layers, create_kv_cache_views(buf, spec, num_blocks, layout, tensor)))
    return [views[n] for n in names]


def unsupported_groups(kv_cache_config: Any) -> str | None:
    """Why the KV cache groups are not supported (both sides check this), or None."""
    groups = _groups(kv_cache_config)
    if len(groups) != 1:
        return f"{len(groups)} KV cache groups (hybrid models need HMA support; one group is supported)"
    spec = groups[0].kv_cache_spec
    if not getattr(spec, "has_layer_views", True):
        return f"KV cache spec {type(spec).__name__} has no per-layer views"
    return None


def unsupported_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why the workers could not move this KV cache, or None when they can."""
    problem = unsupported_groups(kv_cache_config)
    if problem:
        return problem
    try:
        ops.describe_kv_caches(_meta_views(vllm_config, kv_cache_config), int(kv_cache_config.num_blocks))
    except Exception as e:
        return f"unsupported KV cache layout: {e}"
    return None
