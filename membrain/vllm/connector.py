"""MembrainConnector: vLLM 0.32 ``KVConnectorBase_V1`` facade over Membrain's tiers.

Split as vLLM's own offloading connector is: this class only routes vLLM's calls to the half
that runs in this process --

* :class:`~membrain.vllm.scheduler.MembrainScheduler` (engine core): matching, planning,
  per-request state, KV events, ``reset_cache``;
* :class:`~membrain.vllm.worker.MembrainWorker` (each TP x PP rank): transfers through the
  tiers, load-error reporting, stats.

Design decisions that show in vLLM's interface:

* The engine never waits on the network: ``get_num_new_matched_tokens`` answers ``None`` ("ask
  again") while a remote lookup runs in the background, every load is asynchronous (``(n,
  True)``: the request waits in WAITING_FOR_REMOTE_KVS) and comes back through ``get_finished``
  with its failed blocks in the same step's ``get_block_ids_with_load_errors``.

* ``get_required_kvcache_layout`` is not declared: every layout vLLM 0.32 can resolve is moved
  at memory-copy speed (see :mod:`membrain.ops`), while forcing one (e.g. block-outermost
  ``BLNHC``) would override the attention backend's preference and breaks kernel-block splitting,
  which vLLM allows only for layer-compact layouts.
* ``SupportsHMA``: vLLM keeps its hybrid KV-cache manager on (without it vLLM turns the manager
  off for every model once a connector is configured: sliding-window layers then keep every
  block, and Mamba hybrids fail at start-up). Each KV-cache group has its own key space and
  hits follow vLLM's hybrid prefix-cache rules (see :mod:`membrain.vllm.scheduler`); groups
  Membrain cannot serve (Mamba / linear-attention state) disable Membrain at start-up, with the
  reason in the log, and vLLM computes everything.
* ``requires_kv_delivery`` is False: Membrain is a best-effort cache; a dropped store is a future
  miss, never a lost hand-off.
* vLLM's ``kv_load_failure_policy`` defaults to ``"fail"`` (a failed load fails the request).
  Membrain's loads fail only as misses, so it switches the policy to ``"recompute"`` unless the
  extra config sets ``load_failure_policy: fail`` (then it warns at start-up).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from membrain.tiers.remote import RemoteTier, make_client, make_codec
from membrain.vllm import config as mcfg
from membrain.vllm.metadata import MembrainMetadata
from membrain.vllm.scheduler import MembrainScheduler
from membrain.vllm.stats import MembrainStats
from membrain.vllm.worker import MembrainWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.membrain")

__all__ = ["MembrainConnector", "MembrainMetadata"]


def _route_membrain_logs_to_vllm() -> None:
    """The tiers and the client log under ``membrain.*``, outside vLLM's ``vllm`` logger tree,
    so inside vLLM their INFO lines (host-tier prefault, remote health) would go nowhere. Give
    the ``membrain`` logger vLLM's handlers and level, unless the application configured it."""
    ours, theirs = logging.getLogger("membrain"), logging.getLogger("vllm")
    if ours.handlers or ours.level != logging.NOTSET or not theirs.handlers:
        return
    for h in theirs.handlers:
        ours.addHandler(h)
    ours.setLevel(theirs.getEffectiveLevel())
    ours.propagate = False


_route_membrain_logs_to_vllm()


def _apply_failure_policy(kv_transfer_config: Any, settings: mcfg.MembrainSettings) -> None:
    if settings.load_failure_policy == "fail":
        kv_transfer_config.kv_load_failure_policy = "fail"
        logger.warning(
            "Membrain: load_failure_policy=fail -- a request whose Membrain load fails (server down, "
            "timeout, eviction race) ends with an error instead of recomputing"
        )
    elif getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
        kv_transfer_config.kv_load_failure_policy = "recompute"
        logger.info("Membrain: kv_load_failure_policy set to 'recompute' (a failed load is a miss)")


def _kv_elem_size(vllm_config: VllmConfig) -> int:
    """Bytes per KV element (the wire codec's shuffle width): 1 for fp8 caches, else the
    model dtype's (2 for bf16 / fp16)."""
    try:
        if str(vllm_config.cache_config.cache_dtype).startswith("fp8"):
            return 1
        return int(vllm_config.model_config.dtype.itemsize)
    except Exception:
        return 2


class MembrainConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.settings = mcfg.resolve(extra)  # ConfigError -> start-up error
        remote: RemoteTier | None = None
        if self.settings.remote:
            client = make_client(self.settings)
            if client is not None:
                remote = RemoteTier(
                    client,
                    self.settings.max_inflight,
                    self.settings.timeout_ms,
                    codec=make_codec(self.settings, _kv_elem_size(vllm_config)),
                )
        self._scheduler: MembrainScheduler | None = None
        self._worker: MembrainWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            _apply_failure_policy(self._kv_transfer_config, self.settings)
            self._scheduler = MembrainScheduler(vllm_config, kv_cache_config, self.settings, remote)
        else:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            self._worker = MembrainWorker(
                vllm_config,
                kv_cache_config,
                self.settings,
                remote,
                get_tp_group().rank_in_group,
                get_pp_group().rank_in_group,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # ---------------------------------------------------------------- scheduler side

    def _sched(self) -> MembrainScheduler:
        assert self._scheduler is not None, "scheduler-side call on a worker connector"
        return self._scheduler

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        return self._sched().get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call with HMA on (every group's blocks): the same answer as
        :meth:`request_finished` -- stores read their blocks within the step that computed them,
        so no free is ever delayed."""
        return self._sched().request_finished(request, list(block_ids[0]) if block_ids else [])

    def update_connector_output(self, connector_output: Any) -> None:
        if self._scheduler is not None:
            self._scheduler.update_connector_output(connector_output)

    def take_events(self) -> list[Any]:
        return self._scheduler.take_events() if self._scheduler is not None else []

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler is not None else None

    # ---------------------------------------------------------------- worker side

    def _work(self) -> MembrainWorker:
        assert self._worker is not None, "worker-side call on the scheduler connector"
        return self._worker

    def _meta(self) -> MembrainMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        assert isinstance(meta, MembrainMetadata)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._work().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None:
            self._work().start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        meta = self._meta()
        if meta is not None:
            self._work().wait_for_save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        meta = self._meta()
        recving = self._worker.get_finished(finished_req_ids, idle_step=meta is not None and meta.idle_step)
        return None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def get_kv_connector_stats(self) -> MembrainStats | None:
        if self._worker is not None:
            return self._worker.take_stats()
        return self._scheduler.take_stats() if self._scheduler is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> MembrainStats:
        return MembrainStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: Any,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        from membrain.vllm.stats import MembrainPromMetrics

        return MembrainPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        elif self._scheduler is not None:
            self._scheduler.tiers.close()
            if self._scheduler.remote is not None:
                self._scheduler.remote.close()
