"""Worker side of the Membrain connector (one per TP x PP rank): transfers and completion.

Each step the worker runs the scheduler's plans on its own KV cache through a
:class:`~membrain.tiers.executor.TierExecutor` (the data movement lives in the tiers). Loads are
synchronous in ``start_load_kv`` (vLLM calls it before the forward when a step has loads); stores
gather the step's newly full blocks into host slots in ``wait_for_save`` -- after that the device
blocks are free -- and ship them to the remote tier in the background.

Never silent: every block of a load plan either lands or is reported through
``get_block_ids_with_load_errors`` -- also when this worker cannot serve loads at all (its KV
tensors could not be described, the host tier could not be created, a device error) -- and with
``kv_load_failure_policy="recompute"`` vLLM recomputes those blocks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from membrain import tracing
from membrain.tiers.executor import TierExecutor
from membrain.tiers.remote import RemoteTier
from membrain.vllm import keys as mkeys
from membrain.vllm import kv_format
from membrain.vllm.config import MembrainSettings
from membrain.vllm.metadata import MembrainMetadata
from membrain.vllm.stats import MembrainStats, StatsRecorder

logger = logging.getLogger("vllm.membrain")


class MembrainWorker:
    def __init__(
        self,
        vllm_config: Any,
        kv_cache_config: Any,
        settings: MembrainSettings,
        remote: RemoteTier | None,
        tp_rank: int,
        pp_rank: int,
    ) -> None:
        self.settings = settings
        self.remote = remote
        self.block_size = int(vllm_config.cache_config.block_size)
        self.kv_cache_config = kv_cache_config
        groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
        self.layer_names = list(groups[0].layer_names) if len(groups) == 1 else []
        # Counters that describe requests (tokens, blocks, calls) come from one rank only: vLLM
        # sums connector stats over all TP x PP ranks. Bytes are real per rank and summed.
        self.lead = tp_rank == 0 and pp_rank == 0
        self.epoch = "0"
        self._fields = mkeys.identity_fields(vllm_config, kv_cache_config, tp_rank, pp_rank)
        self.identity = mkeys.identity_digest(self._fields, self.epoch)
        self.executor: TierExecutor | None = None
        self.unusable: str | None = "register_kv_caches was not called"
        self._failed: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._stats = StatsRecorder()

    # ---------------------------------------------------------------- set-up

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        try:
            problem = kv_format.unsupported_groups(self.kv_cache_config)
            if problem:
                raise ValueError(problem)
            num_blocks = getattr(self.kv_cache_config, "num_blocks", None)
            kv = kv_format.describe_worker_caches(kv_caches, self.layer_names, num_blocks)
        except Exception as e:
            # Loads planned anyway are reported as errors (see start_load_kv); stores are skipped.
            self.unusable = f"unsupported KV cache tensors: {e}"
            logger.error("Membrain cannot use this worker's KV cache (%s): every load is a miss", e)
            return
        self.executor = TierExecutor(kv, self.remote, self.settings.max_inflight, self._sync)
        self.unusable = None
        t = kv_caches[self.layer_names[0]]
        logger.info(
            "Membrain worker: %d layers, shape %s stride %s dtype %s, %d bytes/block, identity %s",
            len(self.layer_names),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
            kv.packed_nbytes(1),
            self.identity,
        )

    def _sync(self) -> None:
        kv = self.executor.kv if self.executor is not None else None
        if kv is not None and kv.device_type == "cuda":
            import torch

            torch.cuda.current_stream(kv.device_index).synchronize()

    def _key(self, h: bytes) -> bytes:
        return mkeys.block_key(self.identity, h)

    def _adopt(self, meta: MembrainMetadata) -> None:
        """Follows the scheduler's key epoch and host-tier resets."""
        if meta.epoch and meta.epoch != self.epoch:
            self.epoch = meta.epoch
            self.identity = mkeys.identity_digest(self._fields, self.epoch)
        if meta.clear_host and self.executor is not None:
            self.executor.clear_host()

    # ---------------------------------------------------------------- per step

    def start_load_kv(self, meta: MembrainMetadata) -> None:
        self._adopt(meta)
        self._failed_reqs = set()
        for rid, plan in meta.loads.items():
            t0 = time.perf_counter()
            span = tracing.load_span(rid, len(plan.block_ids))
            failed: list[int]
            host_ok = remote_ok = 0
            if self.executor is None:
                failed = list(plan.block_ids)
                reason = self.unusable
            else:
                try:
                    res = self.executor.load(plan, [self._key(h) for h in plan.hashes], meta.host_capacity)
                    failed, host_ok, remote_ok = res.failed_block_ids, res.host_blocks, res.remote_blocks
                    reason = "blocks missing from their tier"
                except Exception as e:  # a device or pool error: recompute, never a crash
                    logger.exception("Membrain load for req %s failed", rid)
                    failed, reason = list(plan.block_ids), f"load error: {e}"
            bb = self.executor.block_bytes if self.executor is not None else 0
            span.end(
                host_blocks=host_ok,
                remote_blocks=remote_ok,
                failed_blocks=len(failed),
                bytes=(host_ok + remote_ok) * bb,
            )
            self._stats.add(
                load_bytes_host=host_ok * bb,
                load_bytes_remote=remote_ok * bb,
                load_failed_blocks=len(failed),
            )
            if self.lead:
                self._stats.add(
                    load_tokens_host=host_ok * self.block_size,
                    load_tokens_remote=remote_ok * self.block_size,
                    load_seconds=time.perf_counter() - t0,
                    loads=1,
                )
            if failed:
                self._failed.update(failed)
                self._failed_reqs.add(rid)
                logger.warning(
                    "Membrain load for req %s: %d of %d blocks failed (%s); vLLM recomputes them",
                    rid,
                    len(failed),
                    len(plan.block_ids),
                    reason,
                )
        if self.executor is not None and meta.evict:
            self.executor.evict_host([self._key(h) for h in meta.evict])

    def wait_for_save(self, meta: MembrainMetadata) -> None:
        if self.executor is None:
            return
        for rid, plan in meta.stores.items():
            if rid in self._failed_reqs:
                continue  # this step computed on top of a failed load: its KV must not be stored
            t0 = time.perf_counter()
            keys = [self._key(h) for h in plan.hashes]
            span = tracing.store_span(rid, len(keys))
            rspan = tracing.remote_store_span(rid, sum(plan.to_remote), parent=span)

            def done(stored: int, failed: int, rspan: Any = rspan) -> None:
                self._remote_done(stored, failed)
                rspan.end(remote_blocks=stored, dropped_blocks=failed, bytes=stored * self._block_bytes())

            try:
                res = self.executor.store(plan, keys, meta.host_capacity, done)
            except Exception:
                logger.exception("Membrain store for req %s failed; its blocks are not cached", rid)
                span.end(dropped_blocks=len(keys))
                rspan.end(remote_blocks=0, dropped_blocks=sum(plan.to_remote))
                continue
            if res.remote_blocks == 0:
                rspan.end(remote_blocks=0, dropped_blocks=sum(plan.to_remote))
            bb = self.executor.block_bytes
            span.end(
                host_blocks=res.host_blocks,
                remote_blocks=res.remote_blocks,
                dropped_blocks=res.dropped_blocks,
                bytes=res.host_blocks * bb,
            )
            self._stats.add(store_bytes_host=res.host_blocks * bb, store_dropped_blocks=res.dropped_blocks)
            if self.lead:
                self._stats.add(
                    store_tokens_host=res.host_blocks * self.block_size,
                    store_seconds=time.perf_counter() - t0,
                    stores=1,
                )
            logger.info(
                "MEMBRAIN STORE req=%s tokens=%d host=%d remote=%d (remote shipped asynchronously)",
                rid,
                len(keys) * self.block_size,
                res.host_blocks * self.block_size,
                res.remote_blocks * self.block_size,
            )

    def _block_bytes(self) -> int:
        return self.executor.block_bytes if self.executor is not None else 0

    def _remote_done(self, stored: int, failed: int) -> None:
        bb = self._block_bytes()
        self._stats.add(store_bytes_remote=stored * bb, store_dropped_blocks=failed)
        if self.lead:
            self._stats.add(store_tokens_remote=stored * self.block_size)

    # ---------------------------------------------------------------- completion

    def take_load_errors(self) -> set[int]:
        out, self._failed = self._failed, set()
        return out

    def take_stats(self) -> MembrainStats | None:
        return self._stats.take()

    def shutdown(self) -> None:
        if self.remote is not None:
            # Let stores already shipped finish (bounded), so an instance that exits right after
            # its last request still leaves its blocks for the next one.
            if not self.remote.drain(2 * self.settings.timeout_ms / 1000.0):
                logger.warning(
                    "Membrain: %d blocks still in flight at shutdown; dropped", self.remote.inflight
                )
            self.remote.close()
