"""MembrainConnector with vLLM's hybrid KV-cache manager (HMA): a Gemma-3-style model whose KV
cache has a full-attention group and a sliding-window group, built by vLLM's own
``get_kv_cache_config_from_groups`` + ``allocate_kv_cache`` (membrain.bench.vllm_kv), with
vLLM's own ``KVCacheManager`` allocating the blocks (null blocks below the window included).

* the hit rule is vLLM's: for every subset of held (group, block) units, the hit Membrain
  computes equals what vLLM's ``HybridKVCacheCoordinator`` finds in its own prefix cache;
* a fresh instance loads a prompt another instance stored (through the remote tier): every
  full-attention block and exactly the sliding-window blocks vLLM allocated (never its null
  block), byte-exact, counted once per block in the stats;
* with ``prefix_cache_retention_interval`` only the sliding-window blocks vLLM's own cache keeps
  reachable are stored, and a later hit still lands where vLLM's rule allows.
"""

from __future__ import annotations

import random
from types import SimpleNamespace as NS
from typing import Any

import pytest

pytest.importorskip("vllm")

from connector_driver import matched, run_step
from fakes import FakeClient

from membrain.bench.vllm_kv import build_hybrid_vllm_kv, same_bytes

BS, WINDOW, BLOCKS = 16, 32, 64
NEED = 2  # SlidingWindowManager: cdiv(WINDOW - 1, BS) blocks before the hit end


@pytest.fixture(autouse=True)
def _ranks(monkeypatch):
    import vllm.distributed.parallel_state as ps

    monkeypatch.setattr(ps, "get_tp_group", lambda: NS(rank_in_group=0))
    monkeypatch.setattr(ps, "get_pp_group", lambda: NS(rank_in_group=0))


def _request(rid: str, tokens: list[int]) -> Any:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        block_hasher=get_request_block_hasher(BS, sha256),
    )


def _manager(kv: Any) -> Any:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    return KVCacheManager(
        kv.kv_cache_config, max_model_len=BS * BLOCKS, scheduler_block_size=BS, hash_block_size=BS
    )


def _tokens(n: int, seed: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(1, 1000) for _ in range(n)]


def _instance(fc: FakeClient, seed: int, retention: int | None = None):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from membrain.tiers.remote import RemoteTier
    from membrain.vllm.connector import MembrainConnector

    kv = build_hybrid_vllm_kv(num_blocks=BLOCKS, block_size=BS, sliding_window=WINDOW, seed=seed)
    kv.vllm_config.cache_config.prefix_cache_retention_interval = retention
    kv.vllm_config.kv_transfer_config.kv_connector_extra_config = {"cpu_cache_size": 0, "remote": 0}
    s = MembrainConnector(kv.vllm_config, KVConnectorRole.SCHEDULER, kv.kv_cache_config)
    w = MembrainConnector(kv.vllm_config, KVConnectorRole.WORKER, kv.kv_cache_config)
    w._worker.remote = RemoteTier(fc)
    s._scheduler.remote = s._scheduler.tiers.remote = RemoteTier(fc)
    w.register_kv_caches(kv.kv_caches)
    mgr = _manager(kv)
    s.bind_kv_cache_manager(mgr)
    return s, w, kv, mgr


def _compute(s, w, mgr, req):
    """Instance computes ``req`` as vLLM's scheduler would (no hit): allocation, one step, store."""
    assert matched(s, req) == (0, False)
    blocks = mgr.allocate_slots(req, req.num_tokens)
    s.update_state_after_alloc(req, mgr.get_blocks(req.request_id), 0)
    assert blocks is not None
    meta, _ = run_step(s, w, [(req.request_id, 0)], {req.request_id: req.num_tokens})
    assert w._worker.remote.drain(5)
    return meta


def _group_pages(kv, group: int, block: int) -> list[Any]:
    return [kv.kv_caches[n][block] for n in kv.kv_cache_config.kv_cache_groups[group].layer_names]


def test_connector_keeps_vllms_hybrid_manager_on():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import supports_hma

    from membrain.vllm.connector import MembrainConnector

    assert supports_hma(MembrainConnector)


@pytest.mark.parametrize("seed", range(3))
def test_hit_rule_is_vllms_hybrid_prefix_cache_rule(seed):
    """Whatever (group, block) units are held, Membrain's hit end is the one vLLM's own
    HybridKVCacheCoordinator finds when its prefix cache holds exactly those blocks."""
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    from membrain.tiers.manager import hybrid_hit_end

    kv = build_hybrid_vllm_kv(num_blocks=BLOCKS, block_size=BS, sliding_window=WINDOW, seed=None)
    rng = random.Random(seed)
    n_blocks = 10
    for trial in range(60):
        req = _request(f"t{trial}", _tokens(n_blocks * BS + rng.randrange(0, 3), seed * 1000 + trial))
        hashes = [bytes(h) for h in req.block_hashes]
        p_full, p_sw = rng.choice([(1.0, 0.7), (0.9, 0.8), (0.95, 0.5), (1.0, 1.0)])
        held = {(0, i) for i in range(n_blocks) if rng.random() < p_full}
        held |= {(1, i) for i in range(n_blocks) if rng.random() < p_sw}
        mgr = _manager(kv)
        pool = mgr.coordinator.single_type_managers[0].block_pool
        for g, i in sorted(held):
            blk = pool.get_new_blocks(1)[0]
            pool._insert_block_hash(make_block_hash_with_group_id(req.block_hashes[i], g), blk, BS)
            pool.free_blocks([blk])
        _blocks, vllm_tokens = mgr.get_computed_blocks(req)[:2]

        def held_run(ids: list[Any], held: set[tuple[int, int]] = held) -> int:
            n = 0
            while n < len(ids) and ids[n] in held:
                n += 1
            return n

        max_blocks = (req.num_tokens - 1) // BS
        uid = lambda g, i: (g, i)  # noqa: E731
        ours = hybrid_hit_end(0, max_blocks, [0], [(1, NEED)], uid, held_run, max_rounds=max_blocks + 1)
        assert ours * BS == vllm_tokens, (trial, sorted(held), ours, vllm_tokens)
        # Bounded rounds (the remote path) only ever answer less, never more.
        assert hybrid_hit_end(0, max_blocks, [0], [(1, NEED)], uid, held_run) <= ours
        assert len(hashes) >= max_blocks


def test_fresh_instance_loads_full_blocks_and_the_window_vllm_allocated():
    fc = FakeClient()
    s_a, w_a, kv_a, mgr_a = _instance(fc, seed=1)
    tokens = _tokens(10 * BS + 1, 7)  # 10 full blocks and one token
    req_a = _request("a", tokens)
    meta = _compute(s_a, w_a, mgr_a, req_a)
    plan = meta.stores["a"]
    # Every block of both groups (vLLM's default dense retention), each under its group's key.
    assert sorted(zip(plan.groups, plan.positions)) == [(g, i) for g in (0, 1) for i in range(10)]
    assert 0 not in plan.block_ids and len(fc.data) == 20
    ids_a = mgr_a.get_block_ids("a")

    s_b, w_b, kv_b, mgr_b = _instance(fc, seed=2)  # a fresh instance: other bytes, empty caches
    req_b = _request("b", tokens)
    _computed, local = mgr_b.get_computed_blocks(req_b)[:2]
    assert local == 0
    assert matched(s_b, req_b) == (10 * BS, True)
    # vLLM's own allocation for an asynchronous load of 160 external tokens.
    assert mgr_b.allocate_slots(req_b, 0, num_external_computed_tokens=10 * BS, delay_cache_blocks=True)
    ids_b = mgr_b.get_block_ids("b")
    assert ids_b[1][:8] == [0] * 8 and 0 not in ids_b[1][8:10]  # null below the window
    s_b.update_state_after_alloc(req_b, mgr_b.get_blocks("b"), 10 * BS)
    meta, errors = run_step(s_b, w_b, [], {})
    load = meta.loads["b"]
    assert not errors and 0 not in load.block_ids
    assert sorted(zip(load.groups, load.positions)) == [(0, i) for i in range(10)] + [(1, 8), (1, 9)]
    for g, i, b in zip(load.groups, load.positions, load.block_ids):
        assert b == ids_b[g][i]
        assert same_bytes(_group_pages(kv_b, g, b), _group_pages(kv_a, g, ids_a[g][i])), (g, i)
    stats = w_b.get_kv_connector_stats()
    assert stats is not None and stats.data["load_tokens_remote"] == 10 * BS  # each block once
    assert stats.data["load_bytes_remote"] == 12 * w_b._worker.executor.block_bytes


def test_sparse_retention_stores_only_reachable_window_blocks_and_hits_where_vllm_would():
    fc = FakeClient()
    s_a, w_a, _kv_a, mgr_a = _instance(fc, seed=1, retention=4 * BS)
    tokens = _tokens(10 * BS + 1, 11)
    meta = _compute(s_a, w_a, mgr_a, _request("a", tokens))
    plan = meta.stores["a"]
    sw = sorted(i for g, i in zip(plan.groups, plan.positions) if g == 1)
    # vLLM's reachable_block_mask: the window before each 4-block segment end, and before the
    # prompt's replay boundary (block 10).
    assert sw == [2, 3, 6, 7, 8, 9]
    stored = {(g, i) for g, i in zip(plan.groups, plan.positions)}
    # A prompt sharing the first 7 blocks: full attention could serve 7, but the window before
    # block 7 ([5, 7)) was not kept, nor the one before 5 ([3, 5)): the hit is block 4.
    s_b, _w_b, _kv_b, _mgr_b = _instance(fc, seed=2, retention=4 * BS)
    other = tokens[: 7 * BS] + _tokens(3 * BS + 1, 12)
    assert matched(s_b, _request("b", other)) == (4 * BS, True)
    assert {(1, 2), (1, 3)} <= stored and (1, 4) not in stored


def test_extends_vllms_own_local_hybrid_hit():
    """B's own prefix cache holds the first 4 blocks (a shorter prompt it computed): vLLM's local
    hit is 4 blocks and Membrain loads [4, 10) of the full-attention group and only the window
    [8, 10) of the sliding-window group -- the blocks vLLM allocates beyond its own hit."""
    fc = FakeClient()
    s_a, w_a, kv_a, mgr_a = _instance(fc, seed=1)
    tokens = _tokens(10 * BS + 1, 5)
    _compute(s_a, w_a, mgr_a, _request("a", tokens))
    ids_a = mgr_a.get_block_ids("a")
    s_b, w_b, kv_b, mgr_b = _instance(fc, seed=2)
    short = _request("short", tokens[: 4 * BS + 1])
    s_b._scheduler.remote = s_b._scheduler.tiers.remote = None  # computed locally, not loaded
    _compute(s_b, w_b, mgr_b, short)
    s_b.request_finished_all_groups(short, mgr_b.get_block_ids("short"))
    mgr_b.free(short)
    s_b._scheduler.remote = s_b._scheduler.tiers.remote = w_b._worker.remote
    req = _request("b", tokens)
    computed, local = mgr_b.get_computed_blocks(req)[:2]
    assert local == 4 * BS
    assert matched(s_b, req, local) == (6 * BS, True)
    assert mgr_b.allocate_slots(
        req,
        0,
        num_new_computed_tokens=local,
        new_computed_blocks=computed,
        num_external_computed_tokens=6 * BS,
        delay_cache_blocks=True,
    )
    ids_b = mgr_b.get_block_ids("b")
    s_b.update_state_after_alloc(req, mgr_b.get_blocks("b"), 6 * BS)
    meta, errors = run_step(s_b, w_b, [], {})
    load = meta.loads["b"]
    assert not errors and 0 not in load.block_ids
    assert sorted(zip(load.groups, load.positions)) == [(0, i) for i in range(4, 10)] + [(1, 8), (1, 9)]
    for g, i, b in zip(load.groups, load.positions, load.block_ids):
        assert b == ids_b[g][i]
        assert same_bytes(_group_pages(kv_b, g, b), _group_pages(kv_a, g, ids_a[g][i])), (g, i)


def test_each_group_has_its_own_key_space_and_single_group_keys_stay():
    from membrain.bench.vllm_kv import build_vllm_kv
    from membrain.vllm import keys as mkeys

    fc = FakeClient()
    s, w, kv, _mgr = _instance(fc, seed=None)
    h = b"\x07" * 32
    k0, k1 = s._scheduler._key((0, h)), s._scheduler._key((1, h))
    assert k0 != k1 and w._worker._key((0, h)) == k0 and w._worker._key((1, h)) == k1
    fields = mkeys.identity_fields(kv.vllm_config, kv.kv_cache_config, 0, 0)
    assert [g.get("window") for g in fields["groups"]] == [None, WINDOW]
    # One group: the rank's identity, as before hybrid support (stored keys stay valid).
    one = build_vllm_kv("LBHNC", seed=None)
    f1 = mkeys.identity_fields(one.vllm_config, one.kv_cache_config, 0, 0)
    assert mkeys.group_identity(f1, "0", 0) == mkeys.identity_digest(f1, "0")
    assert "window" not in f1["groups"][0]


def test_hybrid_lookup_over_its_budget_admits_the_request_with_the_host_hit():
    """The hybrid path keeps the lookup budget too: a remote that does not answer costs the
    request lookup_budget_ms, then it is admitted with the host tier's hit (none here)."""
    import dataclasses
    import threading
    import time

    fc = FakeClient()
    s_a, w_a, _kv_a, mgr_a = _instance(fc, seed=1)
    tokens = _tokens(10 * BS + 1, 7)
    _compute(s_a, w_a, mgr_a, _request("a", tokens))
    s_b, _w_b, _kv_b, _mgr_b = _instance(fc, seed=2)
    sched = s_b._scheduler
    sched.settings = dataclasses.replace(sched.settings, lookup_budget_ms=50)
    fc.gate = threading.Event()
    req_b = _request("b", tokens)
    try:
        assert s_b.get_num_new_matched_tokens(req_b, 0) == (None, False)
        time.sleep(0.08)
        assert s_b.get_num_new_matched_tokens(req_b, 0) == (0, False)
    finally:
        fc.gate.set()
    assert sched.take_stats().data["lookups_over_budget"] == 1
