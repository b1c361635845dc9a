"""Can Membrain move this KV cache? One answer for the scheduler and the workers.

Workers describe the per-layer tensors vLLM registers (:func:`describe_worker_caches`), one
description per KV-cache group. The scheduler has no tensors, only ``kv_cache_config`` and the
resolved layout; it builds the very views a worker will get with vLLM's own
``create_kv_cache_views`` over a ``meta`` buffer (no memory) and runs the same description on
them (:func:`unsupported_reason`). So a layout the workers would refuse is refused at start-up,
and the scheduler never promises tokens for it. (The kernel block size is chosen inside the
workers; it only reshapes dim 0 and is handled there.)

KV-cache groups (vLLM's hybrid KV-cache manager, HMA): every group has its own layers, spec and
block table; under HMA the groups' layers share the KV tensors and one block pool, so a block id
names one page in the tensors of *its* group's layers only. Membrain moves (group, block) units:
a unit is the pages of one block in every layer of one group. Supported group kinds
(:func:`group_kinds`):

* ``full`` -- full attention (``FullAttentionSpec``, ``MLAAttentionSpec``): a hit needs every
  block of the prefix;
* ``sliding`` -- sliding-window attention (``SlidingWindowSpec``): a hit ending at block ``E``
  needs only the ``cdiv(window - 1 + extra_retained, block_size)`` blocks before ``E``
  (vLLM's ``SlidingWindowManager``), vLLM gives null blocks for the rest.

Anything else (Mamba / linear attention state, chunked-local, cross-attention, sparse or
circular-buffer specs) is refused at start-up with the reason: vLLM then computes every token
and Membrain never promises one. All groups must share the scheduler's block size and the bytes
of one unit (the host tier's slots and the remote values have one size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from membrain import ops

# vLLM's BlockPool takes block 0 as its null block at start-up: a group's block table holds it
# for positions a sliding window skipped. Never read into a key, never written.
NULL_BLOCK_ID = 0

FULL = "full"
SLIDING = "sliding"
_FULL_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
_SLIDING_SPECS = ("SlidingWindowSpec",)


@dataclass(frozen=True)
class GroupKind:
    kind: str  # FULL or SLIDING
    # Blocks before a hit end that a hit needs (sliding window); 0 for full attention.
    window_blocks: int = 0

    def needed_from(self, end: int) -> int:
        """First block position a hit ending at block ``end`` needs in this group."""
        return 0 if self.kind == FULL else max(0, end - self.window_blocks)


def _groups(kv_cache_config: Any) -> list[Any]:
    return list(getattr(kv_cache_config, "kv_cache_groups", None) or [])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_kinds(kv_cache_config: Any) -> list[GroupKind]:
    """The hit rule of every group (raises ValueError for an unsupported spec)."""
    out: list[GroupKind] = []
    for g in _groups(kv_cache_config):
        spec = g.kv_cache_spec
        name = type(spec).__name__
        if name in _FULL_SPECS:
            out.append(GroupKind(FULL))
        elif name in _SLIDING_SPECS:
            # SlidingWindowManager._contiguous_blocks_for_hit: cdiv(window - 1, block_size)
            # blocks (without EAGLE); get_num_skipped_tokens keeps extra_retained_tokens more.
            window = int(spec.sliding_window) - 1 + int(getattr(spec, "extra_retained_tokens", 0) or 0)
            out.append(GroupKind(SLIDING, max(1, _cdiv(window, int(spec.block_size)))))
        elif "Mamba" in name or "Linear" in name:
            raise ValueError(
                f"KV cache group of {name} (Mamba / linear-attention state): Membrain does not "
                "store recurrent state yet"
            )
        else:
            raise ValueError(f"KV cache spec {name} is not supported (full and sliding-window attention are)")
    return out


def unit_bytes(group: Any) -> int:
    return int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)


def block_bytes(kv_cache_config: Any) -> int:
    """Bytes of one unit: one block of every layer of one group (equal for all groups)."""
    return unit_bytes(_groups(kv_cache_config)[0])


def describe_worker_caches(
    kv_caches: Mapping[str, Any], layer_names: Sequence[str], num_blocks: int | None
) -> ops.PagedKV:
    """The worker's description of one group's registered tensors (raises ValueError naming
    the problem when Membrain cannot move them)."""
    missing = [n for n in layer_names if n not in kv_caches]
    if missing:
        raise ValueError(f"vLLM registered no KV tensor for layers {missing[:4]}")
    return ops.describe_kv_caches([kv_caches[n] for n in layer_names], num_blocks=num_blocks)


def _meta_views(vllm_config: Any, kv_cache_config: Any, group_index: int = 0) -> list[Any]:
    """One group's per-layer views as a worker will build them, over a meta buffer."""
    import torch
    from vllm.v1.kv_cache_interface import create_kv_cache_views

    layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
    group = _groups(kv_cache_config)[group_index]
    spec = group.kv_cache_spec
    names = list(group.layer_names)
    views: dict[str, Any] = {}
    size = max(int(t.size) for t in kv_cache_config.kv_cache_tensors)
    buf = torch.empty(size, dtype=torch.int8, device="meta")
    for tensor in kv_cache_config.kv_cache_tensors:
        mine = [n for n in tensor.layers if n in names]
        if not mine:
            continue
        num_blocks = kv_cache_config.num_blocks_of(tensor)
        made = create_kv_cache_views(buf, spec, num_blocks, layout, tensor)
        views.update((n, v) for n, v in zip(tensor.layers, made) if n in names)
    return [views[n] for n in names]


def unsupported_groups(kv_cache_config: Any, block_size: int | None = None) -> str | None:
    """Why the KV cache groups are not supported (both sides check this), or None."""
    groups = _groups(kv_cache_config)
    if not groups:
        return "no KV cache groups"
    try:
        group_kinds(kv_cache_config)
    except ValueError as e:
        return str(e)
    for g in groups:
        if not getattr(g.kv_cache_spec, "has_layer_views", True):
            return f"KV cache spec {type(g.kv_cache_spec).__name__} has no per-layer views"
    if len(groups) > 1:
        sizes = {int(g.kv_cache_spec.block_size) for g in groups}
        if len(sizes) != 1 or (block_size is not None and sizes != {int(block_size)}):
            return f"KV cache groups with block sizes {sorted(sizes)} (one block size is supported)"
        nbytes = {unit_bytes(g) for g in groups}
        if len(nbytes) != 1:
            return f"KV cache groups with {sorted(nbytes)} bytes per block (one size is supported)"
    return None


def page_orders(vllm_config: Any, kv_cache_config: Any) -> list[str]:
    """Byte order of a packed page of every group (``PagedKV.page_order``: ``HNC`` or ``NHC``),
    from the same description of vLLM's views that the workers make -- the one source of the
    page order in Membrain's keys. ``unsupported`` for a group Membrain cannot move."""
    out = []
    for i in range(len(_groups(kv_cache_config))):
        try:
            kv = ops.describe_kv_caches(
                _meta_views(vllm_config, kv_cache_config, i), int(kv_cache_config.num_blocks)
            )
            out.append(kv.page_order)
        except Exception:
            out.append("unsupported")
    return out


def unsupported_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why the workers could not move this KV cache, or None when they can."""
    problem = unsupported_groups(kv_cache_config)
    if problem:
        return problem
    try:
        for i in range(len(_groups(kv_cache_config))):
            ops.describe_kv_caches(
                _meta_views(vllm_config, kv_cache_config, i), int(kv_cache_config.num_blocks)
            )
    except Exception as e:
        return f"unsupported KV cache layout: {e}"
    return None
