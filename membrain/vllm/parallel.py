"""Which KV a TP x PP rank holds, under which key, and which rank stores it.

* Head-sharded KV (MHA / GQA): each TP rank holds its own KV heads. Every rank stores and loads
  its own shard under its own keys (the identity holds the TP rank and size).
* Replicated KV (MLA: every group's spec is an ``MLAAttentionSpec``; vLLM gives it one latent
  "head" whatever the TP size): every TP rank holds the same bytes. One rank -- TP rank 0 of
  each PP stage -- ships them to the remote tier, every rank loads them, and the identity holds
  no TP rank or size (shard 0 of 1), so instances with different TP sizes share the blocks.
  (Each rank keeps its own host tier: it is local memory, so every rank admits its copy there.)
* GQA with more TP ranks than KV heads: vLLM gives each KV head to ``tp_size / heads`` ranks;
  the identity names the head (shard ``tp_rank // replicas`` of ``heads``) and the first rank
  of each head stores it, so e.g. TP = 2 and TP = 4 instances of a 2-KV-head model share.
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
    # The rank's KV shard among ``kv_shards`` distinct ones, each held by ``kv_replicas`` TP
    # ranks: head-sharded KV is shard tp_rank of tp_size (1 replica); MLA is shard 0 of 1
    # (tp_size replicas); GQA with more TP ranks than KV heads is head tp_rank // replicas.
    kv_shard: int = 0
    kv_shards: int = 1
    kv_replicas: int = 1

    @property
    def replicated(self) -> bool:
        """KV identical on several TP ranks (MLA; GQA with TP > KV heads)."""
        return self.kv_replicas > 1

    @property
    def lead(self) -> bool:
        """The one rank that counts per-request stats (vLLM sums stats over ranks)."""
        return self.tp_rank == 0 and self.pp_rank == 0

    @property
    def stores_remote(self) -> bool:
        """Whether this rank ships stores to the remote tier: the first rank of each shard's
        replicas (every rank when nothing is replicated)."""
        return self.tp_rank % self.kv_replicas == 0

    def key_fields(self) -> dict[str, Any]:
        """The parallel part of a block identity: the KV shard, not the TP rank, so instances
        whose ranks hold the same bytes (MLA at any TP size; one KV head per rank at TP = heads
        or above) share keys."""
        return {"tp": [self.kv_shard, self.kv_shards], "pp": [self.pp_rank, self.pp_size]}


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


def _kv_head_replicas(vllm_config: Any, tp_size: int) -> int:
    """TP ranks per KV head when the model has fewer KV heads than TP ranks (vLLM's
    ``QKVParallelLinear.num_kv_head_replicas``), else 1."""
    try:
        total = int(vllm_config.model_config.get_total_num_kv_heads())
    except Exception:  # a config without it (tests' stand-ins): no replication known
        return 1
    return tp_size // total if 0 < total < tp_size and tp_size % total == 0 else 1


def rank_role(vllm_config: Any, kv_cache_config: Any, tp_rank: int, pp_rank: int) -> RankRole:
    pc = vllm_config.parallel_config
    tp_size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    if kv_replicated(vllm_config, kv_cache_config):
        replicas = tp_size
    else:
        replicas = _kv_head_replicas(vllm_config, tp_size)
    return RankRole(
        tp_rank=int(tp_rank),
        tp_size=tp_size,
        pp_rank=int(pp_rank),
        pp_size=int(getattr(pc, "pipeline_parallel_size", 1) or 1),
        kv_shard=int(tp_rank) // replicas,
        kv_shards=tp_size // replicas,
        kv_replicas=replicas,
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


def host_capacity_blocks(cpu_cache_bytes: int, block_bytes: int) -> int:
    """Blocks of ``block_bytes`` (:func:`host_block_bytes`) in a host tier of
    ``cpu_cache_bytes``: the scheduler plans with it and every worker sizes its slots with it,
    so both must compute it here."""
    return cpu_cache_bytes // block_bytes if block_bytes > 0 else 0


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
