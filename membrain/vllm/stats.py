"""Connector stats through vLLM's stats path (worker -> scheduler -> logger / Prometheus).

The payload is a flat ``dict[str, int | float]`` of counters (msgpack-serialisable); aggregation
across workers and intervals is a key-wise sum.
"""

from __future__ import annotations

import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

TIERS = ("host", "remote")
COUNTERS = (
    "load_tokens_host",
    "load_tokens_remote",
    "load_bytes_host",
    "load_bytes_remote",
    "load_failed_blocks",  # once per block (scheduler side, from vLLM's union over ranks)
    "load_failed_shards",  # per rank
    "load_seconds",
    "loads",
    # Minor page faults of the load threads (per rank): fetches into host slots, scatters into
    # the KV cache. A first touch of memory costs one per 4 KiB page on the hot path.
    "load_page_faults_fetch",
    "load_page_faults_scatter",
    "store_tokens_host",
    "store_tokens_remote",
    "store_bytes_host",
    "store_bytes_remote",
    "store_dropped_blocks",
    "store_seconds",
    "stores",
    # The worker's remote-tier circuit breaker (per rank): times it opened, and calls it
    # answered as misses without trying while open.
    "remote_breaker_opens",
    "remote_skipped_calls",
    # scheduler side: blocks looked up beyond vLLM's own hit, hits per tier, host evictions
    "lookup_blocks",
    # lookups still out after lookup_budget_ms: their requests were admitted without the remote
    "lookups_over_budget",
    "hit_blocks_host",
    "hit_blocks_remote",
    "host_evicted_probation",
    "host_evicted_protected",
    "host_evicted_priority",
)
EVICTION_REASONS = ("probation", "protected", "priority")


class MembrainStats(KVConnectorStats):
    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def add(self, key: str, value: float) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> MembrainStats:
        for k, v in (other.data or {}).items():
            if isinstance(v, (int, float)):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = dict(self.data)
        if d.get("loads"):
            d["avg_load_ms"] = round(1e3 * d.get("load_seconds", 0) / d["loads"], 3)
        if d.get("stores"):
            d["avg_store_ms"] = round(1e3 * d.get("store_seconds", 0) / d["stores"], 3)
        asked = d.get("lookup_blocks", 0)
        if asked:
            # Per-tier hit ratios: the host tier over every block asked, the remote tier over
            # those the host tier missed.
            host = d.get("hit_blocks_host", 0)
            d["hit_ratio_host"] = round(host / asked, 4)
            if asked > host:
                d["hit_ratio_remote"] = round(d.get("hit_blocks_remote", 0) / (asked - host), 4)
        return d

    def is_empty(self) -> bool:
        return not any(self.data.values())


class StatsRecorder:
    """Thread-safe accumulator on the worker (remote put completions arrive on other threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = MembrainStats()

    def add(self, **kv: float) -> None:
        with self._lock:
            for k, v in kv.items():
                self._stats.add(k, v)

    def take(self) -> MembrainStats | None:
        with self._lock:
            if self._stats.is_empty():
                return None
            s, self._stats = self._stats, MembrainStats()
            return s


class FailureCounter:
    """``load_failed_blocks``, once per block whatever the number of ranks that failed it: vLLM
    hands the scheduler connector the union of the ranks' invalid blocks of a step
    (``KVOutputAggregator``), but two ranks may report the same block in different steps, so a
    block of a load in flight is counted once until every rank reported the load (the
    aggregated ``finished_recving``)."""

    def __init__(self, stats: StatsRecorder | None = None) -> None:
        self.stats = stats if stats is not None else StatsRecorder()  # where the count goes
        self._blocks: dict[str, list[int]] = {}  # loads sent to the workers, not yet finished
        self._counted: set[int] = set()

    def loading(self, loads: dict[str, Any]) -> None:
        for rid, plan in loads.items():
            self._blocks[rid] = list(plan.block_ids)

    def update(self, out: Any) -> None:
        bad = set(getattr(out, "invalid_block_ids", None) or ()) - self._counted
        if bad:
            self.stats.add(load_failed_blocks=len(bad))
            in_flight = {b for ids in self._blocks.values() for b in ids}
            self._counted |= bad & in_flight
        for rid in getattr(out, "finished_recving", None) or ():
            self._counted.difference_update(self._blocks.pop(rid, ()))


class MembrainPromMetrics(KVConnectorPromMetrics):
    """``vllm:membrain_*`` counters on vLLM's Prometheus endpoint."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[Any], type[Any]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._tokens = self._counter_cls(
            name="vllm:membrain_hit_tokens",
            labelnames=labelnames + ["tier"],
            documentation="Prompt tokens loaded by Membrain, by tier",
        )
        self._stored = self._counter_cls(
            name="vllm:membrain_stored_tokens",
            labelnames=labelnames + ["tier"],
            documentation="Prompt tokens stored by Membrain, by tier",
        )
        self._bytes = self._counter_cls(
            name="vllm:membrain_bytes",
            labelnames=labelnames + ["direction", "tier"],
            documentation="KV bytes moved by Membrain",
        )
        self._failed = self._counter_cls(
            name="vllm:membrain_load_failed_blocks",
            labelnames=labelnames,
            documentation="Blocks whose load failed (recomputed)",
        )
        self._seconds = self._counter_cls(
            name="vllm:membrain_seconds",
            labelnames=labelnames + ["op"],
            documentation="Seconds spent in Membrain loads / stores (worker)",
        )
        self._faults = self._counter_cls(
            name="vllm:membrain_load_page_faults",
            labelnames=labelnames + ["stage"],
            documentation="Minor page faults of Membrain's load threads, by stage (fetch, scatter)",
        )
        self._ops = self._counter_cls(
            name="vllm:membrain_ops",
            labelnames=labelnames + ["op"],
            documentation="Membrain load / store operations",
        )
        self._lookup = self._counter_cls(
            name="vllm:membrain_lookup_blocks",
            labelnames=labelnames,
            documentation="Prompt blocks looked up beyond vLLM's own prefix hit",
        )
        self._over_budget = self._counter_cls(
            name="vllm:membrain_lookups_over_budget",
            labelnames=labelnames,
            documentation="Remote lookups still unanswered after lookup_budget_ms (their requests "
            "were admitted without the remote tier's blocks)",
        )
        self._hit_blocks = self._counter_cls(
            name="vllm:membrain_hit_blocks",
            labelnames=labelnames + ["tier"],
            documentation="Blocks found, by tier (hit ratio: divide by vllm:membrain_lookup_blocks)",
        )
        self._evicted = self._counter_cls(
            name="vllm:membrain_host_evictions",
            labelnames=labelnames + ["reason"],
            documentation="Host-tier evictions by reason: probation (stored once, never reused), "
            "protected (reused), priority (a raised membrain_priority)",
        )

        self._breaker_opens = self._counter_cls(
            name="vllm:membrain_remote_breaker_opens",
            labelnames=labelnames,
            documentation="Times a worker's remote-tier circuit breaker opened (remote failing)",
        )
        self._skipped = self._counter_cls(
            name="vllm:membrain_remote_skipped_calls",
            labelnames=labelnames,
            documentation="Remote-tier calls answered as misses without trying (breaker open)",
        )

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        lv = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        d = transfer_stats_data or {}
        for t in TIERS:
            if d.get(f"load_tokens_{t}"):
                self._tokens.labels(*lv, t).inc(d[f"load_tokens_{t}"])
            if d.get(f"store_tokens_{t}"):
                self._stored.labels(*lv, t).inc(d[f"store_tokens_{t}"])
            if d.get(f"load_bytes_{t}"):
                self._bytes.labels(*lv, "load", t).inc(d[f"load_bytes_{t}"])
            if d.get(f"store_bytes_{t}"):
                self._bytes.labels(*lv, "store", t).inc(d[f"store_bytes_{t}"])
        if d.get("lookup_blocks"):
            self._lookup.labels(*lv).inc(d["lookup_blocks"])
        if d.get("lookups_over_budget"):
            self._over_budget.labels(*lv).inc(d["lookups_over_budget"])
        for t in TIERS:
            if d.get(f"hit_blocks_{t}"):
                self._hit_blocks.labels(*lv, t).inc(d[f"hit_blocks_{t}"])
        for reason in EVICTION_REASONS:
            if d.get(f"host_evicted_{reason}"):
                self._evicted.labels(*lv, reason).inc(d[f"host_evicted_{reason}"])
        if d.get("load_failed_blocks"):
            self._failed.labels(*lv).inc(d["load_failed_blocks"])
        for op in ("load", "store"):
            if d.get(f"{op}_seconds"):
                self._seconds.labels(*lv, op).inc(d[f"{op}_seconds"])
            if d.get(f"{op}s"):
                self._ops.labels(*lv, op).inc(d[f"{op}s"])
        for stage in ("fetch", "scatter"):
            if d.get(f"load_page_faults_{stage}"):
                self._faults.labels(*lv, stage).inc(d[f"load_page_faults_{stage}"])
        if d.get("remote_breaker_opens"):
            self._breaker_opens.labels(*lv).inc(d["remote_breaker_opens"])
        if d.get("remote_skipped_calls"):
            self._skipped.labels(*lv).inc(d["remote_skipped_calls"])
