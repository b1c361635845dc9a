"""What the scheduler side sends to every worker each step (``build_connector_meta``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from membrain.tiers.manager import LoadPlan, StorePlan


@dataclass
class MembrainMetadata(KVConnectorMetadata):
    host_capacity: int = 0
    # Key epoch: changes on reset_cache(), after which no key of an earlier epoch is read or
    # written (in-place weight updates never serve stale KV).
    epoch: str = ""
    loads: dict[str, LoadPlan] = field(default_factory=dict)
    stores: dict[str, StorePlan] = field(default_factory=dict)
    evict: list[bytes] = field(default_factory=list)
    # The host tier was cleared (reset_cache): workers drop every block they hold.
    clear_host: bool = False
    # The step schedules no tokens (every running request waits, e.g. for its KV): vLLM's engine
    # loop then spins empty steps, so a worker with loads in flight waits briefly for one to
    # finish instead of returning at once (the spin would take the CPU the loads need).
    idle_step: bool = False
