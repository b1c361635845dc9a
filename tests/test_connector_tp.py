"""TP, PP and MLA through the connector API: keys and roles per rank (unit tests), and a
multi-process harness (tests/tp_harness.py) with one scheduler connector and two worker ranks in
their own processes, rank-sharded KV built by vLLM's functions, a real Membrain server, and vLLM's
own ``KVOutputAggregator`` combining the ranks' outputs."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

pytest.importorskip("vllm")

from connector_driver import make_request
from tp_harness import BS, Instance

from membrain.bench.vllm_kv import MLA_HEAD_SIZE, build_vllm_kv
from membrain.vllm import keys as mkeys
from membrain.vllm import parallel

pytestmark = pytest.mark.timeout(300)


def _kv(mla: bool, heads: int = 4, layers: int = 2, tp: int = 1, pp: int = 1, names: list[str] | None = None):
    vkv = build_vllm_kv(
        "LBHNC",
        num_layers=layers,
        num_blocks=8,
        block_size=BS,
        num_kv_heads=heads,
        head_size=MLA_HEAD_SIZE if mla else 64,
        mla=mla,
        seed=None,
    )
    vkv.vllm_config.parallel_config.tensor_parallel_size = tp
    vkv.vllm_config.parallel_config.pipeline_parallel_size = pp
    if names is not None:
        vkv.kv_cache_config.kv_cache_groups[0].layer_names = names
    return vkv


def _identity(vkv, tp_rank: int = 0, pp_rank: int = 0) -> str:
    return mkeys.identity_digest(
        mkeys.identity_fields(vkv.vllm_config, vkv.kv_cache_config, tp_rank, pp_rank)
    )


def test_mla_identity_has_no_tp_and_one_rank_per_stage_stores():
    tp1, tp2 = _kv(True, tp=1), _kv(True, tp=2)
    # vLLM's MLA spec is one latent head whatever the TP size: the same bytes, the same keys.
    assert tp1.kv_cache_config.kv_cache_groups[0].kv_cache_spec.num_kv_heads == 1
    assert _identity(tp1) == _identity(tp2, 0) == _identity(tp2, 1)
    roles = [parallel.rank_role(tp2.vllm_config, tp2.kv_cache_config, r, 0) for r in (0, 1)]
    assert [r.replicated for r in roles] == [True, True]
    assert [r.stores_remote for r in roles] == [True, False] and [r.lead for r in roles] == [True, False]
    # Head-sharded KV: per-rank keys, every rank stores its own shard.
    mha = _kv(False, heads=2, tp=2)
    assert _identity(mha, 0) != _identity(mha, 1) != _identity(_kv(False, heads=2, tp=1))
    assert all(parallel.rank_role(mha.vllm_config, mha.kv_cache_config, r, 0).stores_remote for r in (0, 1))


def test_gqa_with_more_tp_ranks_than_kv_heads_keys_the_head_and_stores_it_once():
    """vLLM gives each of 2 KV heads to 2 of 4 TP ranks (num_kv_head_replicas): ranks holding
    the same head share its keys, the first of them stores it, and a TP = 2 instance (one head
    per rank, the same bytes) shares the keys."""
    tp4, tp2 = _kv(False, heads=1, tp=4), _kv(False, heads=1, tp=2)
    for v in (tp4, tp2):
        v.vllm_config.model_config.get_total_num_kv_heads = lambda: 2
    roles = [parallel.rank_role(tp4.vllm_config, tp4.kv_cache_config, r, 0) for r in range(4)]
    assert [(r.kv_shard, r.kv_shards, r.kv_replicas) for r in roles] == [
        (0, 2, 2),
        (0, 2, 2),
        (1, 2, 2),
        (1, 2, 2),
    ]
    assert [r.stores_remote for r in roles] == [True, False, True, False]
    ids4 = [_identity(tp4, r) for r in range(4)]
    assert ids4[0] == ids4[1] != ids4[2] == ids4[3]
    assert ids4[0] == _identity(tp2, 0) and ids4[2] == _identity(tp2, 1)
    assert all(parallel.rank_role(tp2.vllm_config, tp2.kv_cache_config, r, 0).stores_remote for r in (0, 1))


def test_pp_stages_key_their_own_layers_and_size_the_host_tier_by_the_largest_stage():
    names = [f"model.layers.{i}.self_attn" for i in range(5)]
    s0 = _kv(False, layers=3, pp=2, names=names[:3])
    s1 = _kv(False, layers=2, pp=2, names=names[3:])
    assert _identity(s0, 0, 0) != _identity(s1, 0, 1)
    # The same stage rank with other layers (another split) never shares either.
    assert _identity(s0, 0, 0) != _identity(_kv(False, layers=3, pp=2, names=names[2:]), 0, 0)
    page = s0.kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    # The scheduler holds stage 0's config: the host tier is sized per worker with the largest
    # stage's layers (vLLM splits 5 hidden layers over 2 stages as 3 + 2, 7 over 3 as 2 + 3 + 2).
    s0.vllm_config.model_config.hf_text_config = NS(num_hidden_layers=5)
    assert parallel._stage_layer_counts(s0.vllm_config) == [3, 2]
    assert parallel.host_block_bytes(s0.vllm_config, s0.kv_cache_config) == page * 3
    t0 = _kv(False, layers=2, pp=3, names=names[:2])
    t0.vllm_config.model_config.hf_text_config = NS(num_hidden_layers=7)
    assert parallel._stage_layer_counts(t0.vllm_config) == [2, 3, 2]
    assert parallel.host_block_bytes(t0.vllm_config, t0.kv_cache_config) == page * 3
    one = _kv(False, layers=3)
    assert parallel.host_block_bytes(one.vllm_config, one.kv_cache_config) == page * 3


# ---------------------------------------------------------------- multi-process harness


def _req(rid: str, n_tokens: int, tag: bytes = b"p"):
    return make_request(rid, n_tokens, BS, tag)


def _server_items(endpoint: str, namespace: str = "tp") -> tuple[int, int]:
    import membrain

    c = membrain.Client([endpoint], namespace=namespace, timeout_ms=2000)
    try:
        st = c.stats()
        return int(st["items"]), int(st["used_bytes"])
    finally:
        c.close()


def test_tp2_head_sharded_shards_per_rank_and_a_missing_shard_is_a_load_error(server):
    import membrain

    a = Instance(server.endpoint, 2, seed=1)
    b = Instance(server.endpoint, 2, seed=2)
    try:
        assert a.identities[0] != a.identities[1] and a.identities == b.identities
        r1, ids_a = _req("r1", 18), [0, 1, 2, 3, 4]  # 4 full blocks + 2 tokens
        a.store(r1, ids_a)
        assert a.stats["store_tokens_remote"] == 16  # counted once (lead rank)
        assert a.stats["store_bytes_remote"] == 2 * 4 * a.block_bytes  # each rank its own shard
        items, used = _server_items(server.endpoint)
        assert items == 2 * 4 and used == 2 * 4 * a.block_bytes
        src = a.blocks(ids_a[:4])
        # Fresh instance B: the scheduler's hit (rank 0's keys) is loaded by both ranks, each
        # its own shard, bit for bit.
        ids_b = [10, 11, 12, 13, 14]
        b.zero(ids_b)
        n, errors, _ = b.load(_req("r2", 18), ids_b)
        assert n == 16 and errors == set()
        got = b.blocks(ids_b[:4])
        assert got[0] == src[0] and got[1] == src[1] and src[0] != src[1]
        assert b.stats["load_tokens_remote"] == 16 and b.stats["loads"] == 1  # once
        assert b.stats["load_bytes_remote"] == 2 * 4 * b.block_bytes
        # Rank 1's shard of block 2 disappears (evicted): rank 0 still holds every block, so the
        # scheduler promises all 4; rank 1 reports block 2 as a load error -- never a silent
        # partial load -- and the request is finished only when both ranks reported it.
        c = membrain.Client([server.endpoint], namespace="tp", timeout_ms=2000)
        assert c.delete([mkeys.block_key(a.identities[1], r1.block_hashes[2])]) == 1
        c.close()
        ids_c = [20, 21, 22, 23, 24]
        b.zero(ids_c)
        b.stats.clear()
        n, errors, recving = b.load(_req("r3", 18), ids_c)
        assert n == 16 and errors == {22}
        assert sum("r3" in s for s in recving) == 1  # reported once, after both ranks
        got = b.blocks(ids_c[:4])
        assert got[0] == src[0]  # rank 0 loaded every block
        assert [got[1][i] == src[1][i] for i in range(4)] == [True, True, False, True]
        assert b.stats["load_failed_blocks"] == 1 and b.stats["load_tokens_remote"] == 16
        assert b.stats["load_failed_shards"] == 1
        # Both ranks lose block 0 after the request was admitted: rank 0 fails block 0, rank 1
        # blocks 0 and 2 (its block 2 is still gone). vLLM's union has each once, and so do the
        # stats: 2 failed blocks (3 failed shards).
        ids_d = [25, 26, 27, 28, 29]
        b.stats.clear()
        n = b.admit(_req("r4", 18), ids_d)
        c = membrain.Client([server.endpoint], namespace="tp", timeout_ms=2000)
        assert c.delete([mkeys.block_key(a.identities[r], r1.block_hashes[0]) for r in (0, 1)]) == 2
        c.close()
        errors = set()
        for _ in range(2000):
            out = b.step()
            errors |= out.invalid_block_ids
            if "r4" in (out.finished_recving or ()):
                break
        assert n == 16 and errors == {25, 27}
        assert b.stats["load_failed_blocks"] == 2 and b.stats["load_failed_shards"] == 3
    finally:
        a.close()
        b.close()


def test_mla_one_copy_per_block_shared_by_tp1_and_tp2(server):
    a1 = Instance(server.endpoint, 1, mla=True, seed=1)
    a2 = Instance(server.endpoint, 2, mla=True, seed=2, cpu_cache=1 << 20)
    b = Instance(server.endpoint, 2, mla=True, seed=3)
    try:
        assert a1.identities[0] == a2.identities[0] == a2.identities[1] == b.identities[1]
        bb = a1.block_bytes
        # TP=1 stores prompt P; TP=2 stores prompt Q: one copy per block either way.
        p, q = _req("p", 18, b"P"), _req("q", 26, b"Q")  # 4 and 6 full blocks
        a1.store(p, [0, 1, 2, 3, 4])
        a2.store(q, [0, 1, 2, 3, 4, 5, 6])
        items, used = _server_items(server.endpoint)
        assert items == 4 + 6
        assert used == items * bb  # used_bytes counts stored values
        assert a2.stats["store_bytes_remote"] == 6 * bb and a2.stats["store_tokens_remote"] == 24
        # Every rank keeps its own copy in its own host tier (local memory): a host hit loads on both.
        assert a2.stats["store_bytes_host"] == 2 * 6 * bb and a2.stats["store_tokens_host"] == 24
        n, errors, _ = a2.load(_req("q1", 26, b"Q"), [10, 11, 12, 13, 14, 15, 16])
        assert n == 24 and errors == set() and a2.stats["load_tokens_host"] == 24
        assert a2.stats.get("load_tokens_remote", 0) == 0
        src_p = a1.blocks([0, 1, 2, 3])[0]
        src_q = a2.blocks(list(range(6)))
        assert src_q[0] != src_q[1]  # the ranks' caches differ before the load (random bytes)
        # Fresh TP=2 instance: every rank loads the one copy, whoever stored it.
        ids = [10, 11, 12, 13, 14]
        b.zero(ids)
        n, errors, _ = b.load(_req("p2", 18, b"P"), ids)
        assert n == 16 and errors == set()
        assert b.blocks(ids[:4]) == [src_p, src_p]
        ids = [20, 21, 22, 23, 24, 25, 26]
        n, errors, _ = b.load(_req("q2", 26, b"Q"), ids)
        assert n == 24 and errors == set()
        assert b.blocks(ids[:6]) == [src_q[0], src_q[0]]
        assert b.stats["load_tokens_remote"] == 40 and b.stats["loads"] == 2
        assert b.stats["load_bytes_remote"] == 2 * 10 * bb  # both ranks really read them
        assert _server_items(server.endpoint)[0] == 10  # loads store nothing
    finally:
        for inst in (a1, a2, b):
            inst.close()


def test_pp2_stages_store_their_own_layers_and_a_missing_stage_block_is_a_load_error(server):
    import membrain

    a = Instance(server.endpoint, 1, pp_size=2, seed=1)
    b = Instance(server.endpoint, 1, pp_size=2, seed=2)
    try:
        assert a.identities[0] != a.identities[1] and a.identities == b.identities
        r1, ids_a = _req("r1", 18), [0, 1, 2, 3, 4]
        a.store(r1, ids_a)
        items, used = _server_items(server.endpoint)
        assert items == 2 * 4 and used == 2 * 4 * a.block_bytes  # each stage its own layers
        assert a.stats["store_tokens_remote"] == 16
        src = a.blocks(ids_a[:4])
        ids_b = [10, 11, 12, 13, 14]
        b.zero(ids_b)
        n, errors, _ = b.load(_req("r2", 18), ids_b)
        assert n == 16 and errors == set() and b.blocks(ids_b[:4]) == src
        # Stage 1 lost block 1: the scheduler (stage 0's keys) still promises 4 blocks; stage 1
        # reports block 1 as a load error.
        c = membrain.Client([server.endpoint], namespace="tp", timeout_ms=2000)
        assert c.delete([mkeys.block_key(a.identities[1], r1.block_hashes[1])]) == 1
        c.close()
        ids_c = [20, 21, 22, 23, 24]
        n, errors, _ = b.load(_req("r3", 18), ids_c)
        assert n == 16 and errors == {21}
        assert b.stats["load_tokens_remote"] == 32 and b.stats["load_failed_blocks"] == 1
        assert b.stats["load_failed_shards"] == 1
    finally:
        a.close()
        b.close()


def test_failed_blocks_count_once_across_ranks_and_steps():
    """Two ranks may report one block in different steps (each when its own load completes):
    the scheduler counts it once until the load is finished on every rank."""
    from membrain.tiers.manager import LoadPlan
    from membrain.vllm.stats import FailureCounter

    fc = FailureCounter()
    fc.loading({"r": LoadPlan(block_ids=[1, 2, 3])})
    fc.update(NS(invalid_block_ids={1}, finished_recving=None))  # rank 0's step
    fc.update(NS(invalid_block_ids={1, 2}, finished_recving={"r"}))  # rank 1, the last to report
    assert fc.stats.take().data == {"load_failed_blocks": 2}
    fc.loading({"s": LoadPlan(block_ids=[1])})  # block 1 reused by a later load
    fc.update(NS(invalid_block_ids={1}, finished_recving={"s"}))
    assert fc.stats.take().data == {"load_failed_blocks": 1}
