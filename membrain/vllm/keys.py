"""Storage keys for KV blocks.

A key is ``mb1:<identity>:<block>`` (ASCII, at most 4 + 32 + 1 + 64 = 101 bytes):

* ``identity`` -- 32 hex chars of SHA-256 over everything that makes the bytes of a block differ
  between instances: model name/path, a fingerprint of its weights (:mod:`membrain.vllm.weights`)
  and a hash of its HF config, model and KV-cache dtypes, the device type, attention backend, the
  byte order of a packed page per group (``HNC`` or ``NHC``: ``PagedKV.page_order`` of the
  views vLLM builds for the resolved KV-cache layout, :func:`kv_format.page_orders`), KV-cache
  spec (block size, heads, head size, page bytes), number and names of the rank's layers (a PP
  stage's own), the rank's KV shard (TP rank and size for head-sharded KV; 0 of 1 for MLA, which
  every TP size shares: :mod:`membrain.vllm.parallel`), PP rank and size, the prefix-caching
  hash algorithm, and the key epoch (changed by ``reset_cache``);
* ``block`` -- vLLM's chained block hash (``request.block_hashes``), hex; longer than 32 bytes it
  is itself hashed.

Instances share blocks only when all of this matches. Requests with different ``cache_salt``
never share: vLLM folds the salt into the first block's hash, so every chained hash differs.
The kernel block size is not part of the key: packed pages are the KV block's whole page in page
order, whether or not the attention backend splits a block into kernel blocks. vLLM's block hashes are process-independent
only with ``prefix_caching_hash_algo`` ``sha256`` / ``sha256_cbor`` (the default); with the
``xxhash`` variants, set the same ``PYTHONHASHSEED`` on every instance. A mismatch is a miss,
never wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from membrain.vllm import kv_format, parallel
from membrain.vllm.weights import weights_fingerprint

KEY_VERSION = "mb1"


def identity_fields(vllm_config: Any, kv_cache_config: Any, tp_rank: int, pp_rank: int) -> dict[str, Any]:
    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    try:
        hf = mc.hf_config.to_json_string(use_diff=False)
    except Exception:  # pragma: no cover - exotic configs
        hf = repr(mc.hf_config)
    groups = []
    for g in getattr(kv_cache_config, "kv_cache_groups", []) or []:
        spec = g.kv_cache_spec
        groups.append(
            {
                "spec": type(spec).__name__,
                "block_size": getattr(spec, "block_size", None),
                "num_kv_heads": getattr(spec, "num_kv_heads", None),
                "head_size": getattr(spec, "head_size", None),
                "dtype": str(getattr(spec, "dtype", None)),
                "page_size_bytes": getattr(spec, "page_size_bytes", None),
                "layers": len(g.layer_names),
                "layer_names": parallel.layer_names_digest(list(g.layer_names)),
                # Sliding-window groups only (full-attention identities stay as they were).
                **({"window": spec.sliding_window} if getattr(spec, "sliding_window", None) else {}),
            }
        )
    try:
        from vllm.platforms import current_platform

        device = str(current_platform.device_type)
    except Exception:  # pragma: no cover
        device = "unknown"
    attn = getattr(vllm_config, "attention_config", None)
    return {
        "v": KEY_VERSION,
        "model": str(mc.model),
        "revision": str(getattr(mc, "revision", None)),
        "hf_config": hashlib.sha256(hf.encode()).hexdigest(),
        "dtype": str(mc.dtype),
        "cache_dtype": str(cc.cache_dtype),
        "block_size": cc.block_size,
        "hash_algo": str(getattr(cc, "prefix_caching_hash_algo", None)),
        "device": device,
        # Per group, from the description of vLLM's views the workers also make: layouts whose
        # packed pages are the same bytes share keys (LBHNC and LHBNC, or any layout with one
        # KV head), others never do.
        "page_order": kv_format.page_orders(vllm_config, kv_cache_config),
        "weights": weights_fingerprint(str(mc.model), getattr(mc, "revision", None)),
        "attn_backend": str(getattr(attn, "backend", None)),
        "groups": groups,
        # The KV shard (TP rank/size; 0/1 for MLA: TP sizes share it), PP rank/size.
        **parallel.rank_role(vllm_config, kv_cache_config, tp_rank, pp_rank).key_fields(),
    }


def identity_digest(fields: dict[str, Any], epoch: str = "0") -> str:
    """32 hex chars identifying the KV byte format of one rank in one key epoch."""
    blob = json.dumps({**fields, "epoch": epoch}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def group_identity(fields: dict[str, Any], epoch: str, group: int) -> str:
    """The identity of KV-cache group ``group``'s key space: with one group the rank's
    identity; with several (vLLM's hybrid KV-cache manager) each group gets its own, which
    includes the group's index and spec (type, block size, window, heads, head size, dtype)."""
    groups = fields.get("groups") or []
    if len(groups) <= 1:
        return identity_digest(fields, epoch)
    return identity_digest({**fields, "kv_group": [group, groups[group]]}, epoch)


def block_key(identity: str, block_hash: bytes) -> bytes:
    """The storage key of one block (<= 101 bytes)."""
    h = bytes(block_hash)
    if len(h) > 32:
        h = hashlib.sha256(h).digest()
    return f"{KEY_VERSION}:{identity}:{h.hex()}".encode()
