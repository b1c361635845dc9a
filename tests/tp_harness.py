"""A vLLM instance with TP ranks in separate processes, driven through the connector API (not a
test module: test_connector_tp imports it).

:class:`Instance` holds the scheduler-side ``MembrainConnector`` in this process and one
worker-role ``MembrainConnector`` per TP rank in its own process (``multiprocessing`` forkserver),
each with its own KV cache built by vLLM's functions (:func:`membrain.bench.vllm_kv.build_vllm_kv`):
head-sharded (``num_kv_heads`` per rank) or MLA (one latent head on every rank), random bytes
seeded per rank. Each step sends the scheduler's metadata to every rank, which runs what vLLM's
model runner runs (``bind_connector_metadata``, ``start_load_kv``, ``wait_for_save``,
``get_finished``, ``get_block_ids_with_load_errors``, ``get_kv_connector_stats``), and the
ranks' outputs are combined by vLLM's own ``KVOutputAggregator`` as the executor does.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from types import SimpleNamespace as NS
from typing import Any

BS, LAYERS, BLOCKS, HEADS, HEAD = 4, 2, 32, 4, 64  # HEADS: KV heads of the whole model


def _build(
    tp_size: int, mla: bool, seed: int | None, extra: dict[str, Any], pp_size: int = 1, pp_rank: int = 0
) -> Any:
    """One rank's KV: its TP shard of its PP stage's ``LAYERS`` layers (the stage's names)."""
    from membrain.bench.vllm_kv import MLA_HEAD_SIZE, build_vllm_kv

    vkv = build_vllm_kv(
        "LBHNC",
        num_layers=LAYERS,
        num_blocks=BLOCKS,
        block_size=BS,
        num_kv_heads=HEADS // tp_size,  # this rank's shard (ignored for MLA: one latent head)
        head_size=MLA_HEAD_SIZE if mla else HEAD,
        mla=mla,
        seed=seed,
        extra=extra,
        first_layer=pp_rank * LAYERS,
    )
    vkv.vllm_config.parallel_config.tensor_parallel_size = tp_size
    vkv.vllm_config.parallel_config.pipeline_parallel_size = pp_size
    return vkv


def _rank_main(
    conn: Any, rank: tuple[int, int], size: tuple[int, int], mla: bool, seed: int, extra: dict[str, Any]
) -> None:
    import torch
    import vllm.distributed.parallel_state as ps
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from membrain.vllm.connector import MembrainConnector

    (tp_rank, pp_rank), (tp_size, pp_size) = rank, size
    ps.get_tp_group = lambda: NS(rank_in_group=tp_rank)  # type: ignore[assignment]
    ps.get_pp_group = lambda: NS(rank_in_group=pp_rank)  # type: ignore[assignment]
    vkv = _build(tp_size, mla, seed, extra, pp_size, pp_rank)
    w = MembrainConnector(vkv.vllm_config, KVConnectorRole.WORKER, vkv.kv_cache_config)
    w.register_kv_caches(vkv.kv_caches)
    wk = w._worker
    conn.send({"identity": wk.identity, "block_bytes": wk.executor.block_bytes})
    while True:
        cmd, arg = conn.recv()
        if cmd == "step":
            meta, finished = arg
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
            w.wait_for_save()
            sending, recving = w.get_finished(finished)
            errors = w.get_block_ids_with_load_errors()
            stats = w.get_kv_connector_stats()
            w.clear_connector_metadata()
            conn.send((sending, recving, errors, stats.data if stats is not None else None))
        elif cmd == "drain":
            conn.send(wk.remote.drain(10) if wk.remote is not None else True)
        elif cmd == "blocks":
            conn.send(
                [
                    b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in vkv.block(b))
                    for b in arg
                ]
            )
        elif cmd == "zero":
            for t in vkv.kv_caches.values():
                t[arg].zero_()
            conn.send(True)
        elif cmd == "stop":
            w.shutdown()
            conn.send(True)
            return


_PRELOAD = ["tp_harness", "membrain.vllm.connector", "membrain.bench.vllm_kv", "vllm.v1.worker.utils"]


def _context() -> Any:
    """``forkserver``: the rank processes are forked from one server process that imported
    vLLM and torch once (spawning each would import them again: slow on two cores); a fresh
    process image either way, never a fork of the test process with its threads."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


class Instance:
    """One instance: a scheduler connector here, ``tp_size`` x ``pp_size`` worker ranks in child
    processes (rank ``i`` is TP rank ``i % tp_size`` of PP stage ``i // tp_size``, as in vLLM);
    the scheduler holds PP stage 0's ``kv_cache_config``, as vLLM's engine core does."""

    def __init__(
        self,
        endpoint: str,
        tp_size: int,
        *,
        pp_size: int = 1,
        mla: bool = False,
        seed: int = 0,
        namespace: str = "tp",
        cpu_cache: int = 0,
    ) -> None:
        from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from membrain.vllm.connector import MembrainConnector

        extra = {
            "endpoint": endpoint,
            "namespace": namespace,
            "cpu_cache_size": cpu_cache,
            "timeout_ms": 5000,
        }
        world = tp_size * pp_size
        vkv = _build(tp_size, mla, None, extra, pp_size, 0)
        self.sched = MembrainConnector(vkv.vllm_config, KVConnectorRole.SCHEDULER, vkv.kv_cache_config)
        self.aggregator = KVOutputAggregator(expected_finished_count=world)
        ctx = _context()
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for r in range(world):
            parent, child = ctx.Pipe()
            rank = (r % tp_size, r // tp_size)
            args = (child, rank, (tp_size, pp_size), mla, seed * 100 + r, extra)
            p = ctx.Process(target=_rank_main, args=args, daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        ready = [self._recv(c) for c in self.conns]
        self.identities = [d["identity"] for d in ready]
        self.block_bytes = ready[0]["block_bytes"]
        self.stats: dict[str, float] = {}

    def _recv(self, conn: Any, timeout_s: float = 120.0) -> Any:
        assert conn.poll(timeout_s), "a rank process did not answer"
        return conn.recv()

    def _all(self, cmd: str, arg: Any = None) -> list[Any]:
        for c in self.conns:
            c.send((cmd, arg))
        return [self._recv(c) for c in self.conns]

    # ---------------------------------------------------------------- scheduler side

    def admit(self, req: Any, block_ids: list[int]) -> int:
        """get_num_new_matched_tokens (asked again while a remote lookup runs), then the
        allocation; returns the external tokens."""
        deadline = time.monotonic() + 10
        while True:
            n, is_async = self.sched.get_num_new_matched_tokens(req, 0)
            if n is not None:
                break
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert is_async is (n > 0)
        self.sched.update_state_after_alloc(req, NS(get_block_ids=lambda: (block_ids,)), n)
        return n

    def step(self, scheduled: list[tuple[Any, list[int], int]] = (), finished: set[str] | None = None) -> Any:
        """One engine step: ``scheduled`` is (request, its block ids, computed tokens) of the
        requests computed in it (whose full blocks are stored). Returns the aggregated
        ``KVConnectorOutput`` (vLLM's ``KVOutputAggregator`` over the ranks)."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        from membrain.vllm.stats import MembrainStats

        ids = {r.request_id: b for r, b, _ in scheduled}
        self.sched._scheduler.kv_cache_manager = NS(get_block_ids=lambda rid: (ids[rid],))
        so = NS(
            scheduled_new_reqs=[NS(req_id=r.request_id, num_computed_tokens=n) for r, _, n in scheduled],
            scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
            num_scheduled_tokens={r.request_id: r.num_tokens - n for r, _, n in scheduled},
        )
        meta = self.sched.build_connector_meta(so)
        outs = []
        for sending, recving, errors, stats in self._all("step", (meta, set(finished or ()))):
            kvo = KVConnectorOutput(
                finished_sending=sending,
                finished_recving=recving,
                invalid_block_ids=errors,
                kv_connector_stats=MembrainStats(data=stats) if stats else None,
            )
            outs.append(ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=kvo))
        out = self.aggregator.aggregate(outs).kv_connector_output
        # vLLM's scheduler: the connector sees the aggregated output, then its own stats join
        # the workers'.
        self.sched.update_connector_output(out)
        for st in (out.kv_connector_stats, self.sched.get_kv_connector_stats()):
            for k, v in (st.data if st is not None else {}).items():
                self.stats[k] = self.stats.get(k, 0) + v
        return out

    def load(self, req: Any, block_ids: list[int]) -> tuple[int, set[int], list[set[str]]]:
        """Admits ``req`` and steps until every rank reported its load (vLLM's
        ``finished_recving`` after aggregation). Returns (external tokens, the invalid block
        ids of all steps, the aggregated finished_recving of each step)."""
        n = self.admit(req, block_ids)
        errors: set[int] = set()
        recving: list[set[str]] = []
        deadline = time.monotonic() + 30
        while n:
            out = self.step()
            errors |= out.invalid_block_ids
            recving.append(set(out.finished_recving or ()))
            if req.request_id in recving[-1]:
                break
            assert time.monotonic() < deadline, "the load was never reported by every rank"
            time.sleep(0.005)
        return n, errors, recving

    def store(self, req: Any, block_ids: list[int]) -> None:
        """Admits ``req`` (a miss) and computes it in one step: its full blocks are stored; then
        the remote puts are drained and one more step collects their stats."""
        assert self.admit(req, block_ids) == 0
        self.step([(req, block_ids, 0)])
        self.sched.request_finished(req, block_ids)
        assert all(self._all("drain"))
        self.step()  # collects the remote puts' stats (they complete in the background)

    # ---------------------------------------------------------------- worker side

    def blocks(self, block_ids: list[int]) -> list[list[bytes]]:
        """Per rank, the bytes of each block (all layers of the rank)."""
        return self._all("blocks", block_ids)

    def zero(self, block_ids: list[int]) -> None:
        self._all("zero", block_ids)

    def close(self) -> None:
        try:
            self._all("stop")
        finally:
            for p in self.procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
            self.sched.shutdown()
