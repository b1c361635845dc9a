"""KV-cache events naming Membrain's tiers, for KV-aware routers (vLLM's ``take_events``).

A block planned into the host tier is published as ``BlockStored`` with medium ``CPU``, locality
``LOCAL`` and ownership ``membrain-host``; one shipped to the remote servers with locality
``REMOTE`` and ownership ``membrain-remote``. Host-tier evictions publish ``BlockRemoved``;
``reset_cache`` publishes ``AllBlocksCleared``. Events are only collected when vLLM's KV events
are enabled (``--kv-events-config``), so they cost nothing otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HOST = "membrain-host"
REMOTE = "membrain-remote"


def _events_enabled(vllm_config: Any) -> bool:
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and getattr(cfg, "enable_kv_cache_events", False))


class EventLog:
    def __init__(self, vllm_config: Any, block_size: int) -> None:
        self.enabled = _events_enabled(vllm_config)
        self.block_size = block_size
        self._events: list[Any] = []

    def stored(self, request: Any, hashes: Sequence[bytes], positions: Sequence[int], plan: Any) -> None:
        """Blocks ``positions`` of ``request`` (with chained ``hashes``) planned by ``plan``: unit
        ``j`` of the plan is block ``positions[j]`` of KV-cache group ``plan.groups[j]``."""
        if not self.enabled:
            return
        from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        bs = self.block_size
        tokens = list(getattr(request, "all_token_ids", []) or [])
        groups = list(getattr(plan, "groups", None) or [])
        for j, i in enumerate(positions):
            for tier, flag in ((HOST, plan.to_host[j]), (REMOTE, plan.to_remote[j])):
                if not flag:
                    continue
                self._events.append(
                    BlockStored(
                        block_hashes=[maybe_convert_block_hash(hashes[i])],
                        parent_block_hash=maybe_convert_block_hash(hashes[i - 1]) if i > 0 else None,
                        token_ids=tokens[i * bs : (i + 1) * bs],
                        block_size=bs,
                        lora_id=None,
                        medium=MEDIUM_CPU,
                        lora_name=None,
                        group_idx=groups[j] if groups else 0,
                        locality="LOCAL" if tier == HOST else "REMOTE",
                        ownership=tier,
                    )
                )

    def removed(self, hashes: Sequence[Any]) -> None:
        """Blocks evicted from the host tier (unit ids: hashes, or ``(group, hash)``)."""
        if not self.enabled or not hashes:
            return
        from vllm.distributed.kv_events import MEDIUM_CPU, BlockRemoved
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        by_group: dict[int, list[Any]] = {}
        for u in hashes:
            g, h = u if isinstance(u, tuple) else (0, u)
            by_group.setdefault(g, []).append(maybe_convert_block_hash(h))
        for g, hs in by_group.items():
            self._events.append(
                BlockRemoved(
                    block_hashes=hs, medium=MEDIUM_CPU, group_idx=g, locality="LOCAL", ownership=HOST
                )
            )

    def cleared(self) -> None:
        if self.enabled:
            from vllm.distributed.kv_events import AllBlocksCleared

            self._events.append(AllBlocksCleared())

    def take(self) -> list[Any]:
        out, self._events = self._events, []
        return out
