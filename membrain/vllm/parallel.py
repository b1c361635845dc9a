"""Which KV a TP x PP rank holds, under which key, and which rank stores it.

* Head-sharded KV (MHA / GQA): each TP rank holds its own KV heads. Every rank stores and loads
  its own shard under its own keys (the identity holds the TP rank and size).
* Replicated KV (MLA: every group's spec is an ``MLAAttentionSpec``; vLLM gives it one latent
  "head" whatever the TP size): every TP rank holds the same bytes. One rank -- TP rank 0 of
  each PP stage -- ships them to the remote tier, every rank loads them, and the identity holds
  no TP rank or size, so instances with different TP sizes share the blocks. (Each rank keeps
  its own host tier: it is local memory, so every rank admits its copy there.)
* PP: each stage holds only its own layers (vLLM projects the KV cache groups onto the stage);
  the identity holds the PP rank and size and the stage's layer names, so stages never collide,
  and the host tier is sized with the bytes of the largest stage.

The scheduler looks blocks up under the keys of rank (TP 0, PP 0). A block another rank cannot
load (its shard missing or evicted) comes back from that rank as a load error -- vLLM unions
load errors over ranks (``KVOutputAggregator``) and recomputes -- never as a partial load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankRole:
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    replicated: bool  # KV identical on every TP rank (MLA)

    @property
    def lead(self) -> bool:
        """The one rank that counts per-request stats (vLLM sums stats over ranks)."""
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def stores_remote(self) -> bool:
        """Whether this rank ships stores to the remote tier (replicated KV: TP rank 0 only)."""
        return not self.replicated or self.tp_rank == 0

    def key_fields(self) -> dict[str, Any]:
        """The parallel part of a block identity."""
        tp: Any = "replicated" if self.replicated else [self.tp_rank, self.tp_size]
        return {"tp": tp, "pp": [self.pp_rank, self.pp_size]}


def _groups(kv_cache_config: Any) -> list[Any]:
    return list(getattr(kv_cache_config, "kv_cache_groups", None) or [])


def kv_replicated(vllm_config: Any, kv_cache_config: Any) -> bool:
    """Whether every TP rank holds the same KV bytes: all groups are MLA (one latent head, not
    sharded by TP). Without groups, the model config's ``use_mla``."""
    groups = _groups(kv_cache_config)
    if groups:
        try:
            from vllm.v1.kv_cache_interface import MLAAttentionSpec
        except ImportError:  # pragma: no cover - vLLM without MLA
            return False
        return all(isinstance(g.kv_cache_spec, MLAAttentionSpec) for g in groups)
    return bool(getattr(getattr(vllm_config, "model_config", None), "use_mla", False))


def rank_role(vllm_config: Any, kv_cache_config: Any, tp_rank: int, pp_rank: int) -> RankRole:
    pc = vllm_config.parallel_config
    return RankRole(
        tp_rank=int(tp_rank),
        tp_size=int(getattr(pc, "tensor_parallel_size", 1) or 1),
        pp_rank=int(pp_rank),
        pp_size=int(getattr(pc, "pipeline_parallel_size", 1) or 1),
        replicated=kv_replicated(vllm_config, kv_cache_config),
    )


def layer_names_digest(layer_names: list[str]) -> str:
    """16 hex chars naming a stage's layers (part of its identity)."""
    return hashlib.sha256("\n".join(layer_names).encode()).hexdigest()[:16]


def _stage_layer_counts(vllm_config: Any) -> list[int] | None:
    """Hidden layers per PP stage as vLLM splits them (``get_pp_indices``), or None."""
    pc = vllm_config.parallel_config
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    if pp <= 1:
        return None
    try:
        from vllm.distributed.utils import get_pp_indices

        hf = vllm_config.model_config.hf_text_config
        n = int(hf.num_hidden_layers)
        return [end - start for start, end in (get_pp_indices(n, r, pp) for r in range(pp))]
    except Exception:
        return None


def host_block_bytes(vllm_config: Any, kv_cache_config: Any) -> int:
    """Bytes one KV block takes in one worker's host tier, for sizing it (the scheduler sizes all
    workers alike): this rank's shard (the spec's page is already per TP rank) of the layers of
    the largest PP stage. ``kv_cache_config`` is the scheduler's -- a copy of rank 0's, so of
    PP stage 0's layers only -- or a worker's own."""
    total = 0
    counts = _stage_layer_counts(vllm_config)
    for g in _groups(kv_cache_config):
        n = len(g.layer_names)
        if counts and counts[0] > 0:
            n = max(n, -(-n * max(counts) // counts[0]))  # stage 0's layers scaled to the largest
        total += int(g.kv_cache_spec.page_size_bytes) * n
    return total
