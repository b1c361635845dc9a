"""MembrainConnector against vLLM 0.32's connector contract, on the KV tensors vLLM builds.

Scheduler and worker halves are driven by hand (no engine) on views made by vLLM's own
``get_kv_cache_config_from_groups`` + ``allocate_kv_cache`` for every KVCacheLayout and
kernel-block split: byte-exact round trips through the connector's worker path, every refusal
path ending as "never promised" or "reported as a load error", keys that cannot collide
(layout page order, weights, cache_salt, reset epoch), configuration parity, and the rest of the
interface (hit sources, KV events, delivery, stats counted once across ranks).
"""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from connector_driver import admit as _admit
from connector_driver import make_request as _req
from connector_driver import step as _step

from membrain.bench.vllm_kv import build_vllm_kv as make_vllm_kv
from membrain.bench.vllm_kv import layout_names, same_bytes, vllm_config
from membrain.vllm import config as mcfg
from membrain.vllm import keys as mkeys

LAYOUTS = layout_names()
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
# Kernel-block splitting: vLLM allows it only where a block is one dense page (LB** layouts).
SPLITS = [(layout, None) for layout in LAYOUTS] + [("LBHNC", 8), ("LBNHC", 8), ("LBNHC", 4)]


@pytest.fixture(autouse=True)
def _ranks(monkeypatch):
    import vllm.distributed.parallel_state as ps

    monkeypatch.setattr(ps, "get_tp_group", lambda: NS(rank_in_group=0))
    monkeypatch.setattr(ps, "get_pp_group", lambda: NS(rank_in_group=0))


def _pair(kv, extra: dict[str, Any] | None = None, register: bool = True):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from membrain.vllm.connector import MembrainConnector

    cfg = kv.vllm_config
    cfg.kv_transfer_config.kv_connector_extra_config = {
        "cpu_cache_size": "8MiB",
        "remote": 0,
        **(extra or {}),
    }
    s = MembrainConnector(cfg, KVConnectorRole.SCHEDULER, kv.kv_cache_config)
    w = MembrainConnector(cfg, KVConnectorRole.WORKER, kv.kv_cache_config)
    if register:
        w.register_kv_caches(kv.kv_caches)
    return s, w


# ---------------------------------------------------------------- every layout, byte-exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("layout", "kernel_block_size"), SPLITS)
def test_store_then_load_into_other_blocks_every_layout(layout, kernel_block_size, device):
    bs = 16
    kv = make_vllm_kv(layout, block_size=bs, kernel_block_size=kernel_block_size, device=device)
    s, w = _pair(kv)
    assert w._worker.unusable is None, w._worker.unusable
    r1 = _req("r1", 4 * bs + 3, bs)
    src = [3, 7, 1, 20, 5]
    want = [kv.block(b) for b in src[:4]]
    assert _admit(s, r1, src) == 0
    meta, errs = _step(s, w, r1, src, 0)
    assert len(meta.stores["r1"].block_ids) == 4 and not errs
    s.request_finished(r1, src)
    dst = [30, 12, 0, 9, 6]
    untouched = [b for b in range(kv.kv_cache_config.num_blocks) if b not in dst[:4]]
    before = {b: kv.block(b) for b in untouched}
    r2 = _req("r2", 4 * bs + 3, bs)
    assert _admit(s, r2, dst) == 4 * bs
    meta, errs = _step(s, w, r2, dst, 4 * bs)
    assert not errs and meta.loads["r2"].block_ids == dst[:4]
    for b, ref in zip(dst[:4], want):
        assert same_bytes(kv.block(b), ref), f"block {b} differs after the load ({layout})"
    assert all(same_bytes(kv.block(b), before[b]) for b in untouched), "a block that was not planned changed"


def test_mla_views_round_trip():
    kv = make_vllm_kv("LBNHC", mla=True, head_size=576, block_size=16, kernel_block_size=8)
    s, w = _pair(kv)
    r1 = _req("r1", 35, 16)
    want = [kv.block(b) for b in (4, 5)]
    _admit(s, r1, [4, 5, 6])
    _step(s, w, r1, [4, 5, 6], 0)
    r2 = _req("r2", 35, 16)
    assert _admit(s, r2, [10, 11, 12]) == 32
    _, errs = _step(s, w, r2, [10, 11, 12], 32)
    assert not errs and same_bytes(kv.block(10), want[0]) and same_bytes(kv.block(11), want[1])


# ---------------------------------------------------------------- never silent


def test_scheduler_promises_nothing_for_what_workers_refuse():
    """A hybrid model with a Mamba (linear-attention state) group: refused at start-up on
    both sides with the reason; the scheduler promises nothing."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MambaSpec

    kv = make_vllm_kv("LBHNC")
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)
    mamba = MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.float32,))
    kv.kv_cache_config.kv_cache_groups = [
        KVCacheGroupSpec(layer_names=["a"], kv_cache_spec=spec),
        KVCacheGroupSpec(layer_names=["b"], kv_cache_spec=mamba),
    ]
    s, w = _pair(kv, register=False)
    assert not s._scheduler.enabled
    assert s.get_num_new_matched_tokens(_req("r", 64, 16), 0) == (0, False)
    w.register_kv_caches(kv.kv_caches)
    assert w._worker.unusable and "Mamba" in w._worker.unusable


def test_worker_that_cannot_use_its_tensors_reports_every_planned_block():
    kv = make_vllm_kv("LBHNC")
    s, w = _pair(kv)
    r1 = _req("r1", 67, 16)
    _admit(s, r1, [0, 1, 2, 3, 4])
    _step(s, w, r1, [0, 1, 2, 3, 4], 0)
    # A second instance whose worker got tensors it cannot describe (a layer missing).
    s2, w2 = _pair(kv, register=False)
    s2._scheduler.tiers = s._scheduler.tiers  # the scheduler believes the host tier has them
    w2.register_kv_caches(dict(list(kv.kv_caches.items())[1:]))
    assert w2._worker.unusable
    r2 = _req("r2", 67, 16)
    assert _admit(s2, r2, [8, 9, 10, 11, 12]) == 64
    _, errs = _step(s2, w2, r2, [8, 9, 10, 11, 12], 64)
    assert errs == {8, 9, 10, 11}


def test_device_error_during_load_is_reported(monkeypatch):
    from membrain import ops

    kv = make_vllm_kv("LBNHC")
    s, w = _pair(kv)
    r1 = _req("r1", 35, 16)
    _admit(s, r1, [0, 1, 2])
    _step(s, w, r1, [0, 1, 2], 0)

    def broken(*a, **k):
        raise RuntimeError("device error")

    monkeypatch.setattr(ops, "scatter_blocks", broken)
    r2 = _req("r2", 35, 16)
    assert _admit(s, r2, [5, 6, 7]) == 32
    _, errs = _step(s, w, r2, [5, 6, 7], 32)
    assert errs == {5, 6}


def test_host_slot_lost_is_reported():
    kv = make_vllm_kv("BLHNC")
    s, w = _pair(kv)
    r1 = _req("r1", 35, 16)
    _admit(s, r1, [0, 1, 2])
    _step(s, w, r1, [0, 1, 2], 0)
    w._worker.executor.evict_host([w._worker._key(r1.block_hashes[1])])
    r2 = _req("r2", 35, 16)
    assert _admit(s, r2, [5, 6, 7]) == 32
    _, errs = _step(s, w, r2, [5, 6, 7], 32)
    assert errs == {6}


# ---------------------------------------------------------------- keys


def test_page_order_in_identity():
    """The key's page order comes from the description of the views vLLM builds: layouts that
    pack to the same bytes share keys, others never do -- and with one KV head both orders are
    the same bytes, so every layout shares."""

    def ident(layout: str, heads: int = 2) -> str:
        kv = make_vllm_kv(layout, num_kv_heads=heads, device="meta", seed=None)
        return mkeys.identity_digest(mkeys.identity_fields(kv.vllm_config, kv.kv_cache_config, 0, 0))

    assert ident("LBHNC") == ident("BLHNC") == ident("LHBNC") == ident("BHLNC")
    assert ident("LBNHC") == ident("BLNHC") != ident("LBHNC")
    assert ident("LBNHC", heads=1) == ident("LBHNC", heads=1) == ident("BHLNC", heads=1)


def test_weights_fingerprint_separates_checkpoints(tmp_path):
    from membrain.vllm.weights import weights_fingerprint

    def ckpt(name: str, fill: int) -> str:
        d = tmp_path / name
        d.mkdir()
        header = b'{"w":{"dtype":"BF16","shape":[1024],"data_offsets":[0,2048]}}'
        (d / "model.safetensors").write_bytes(
            len(header).to_bytes(8, "little") + header + bytes([fill]) * 2048
        )
        (d / "config.json").write_text("{}")
        return str(d)

    a, b, c = ckpt("a", 1), ckpt("b", 2), ckpt("c", 1)
    assert weights_fingerprint(a) != weights_fingerprint(b), "same structure, new weights"
    assert weights_fingerprint(a) == weights_fingerprint(c), "same weights elsewhere share"
    fa = mkeys.identity_fields(vllm_config("LBHNC", 16, model=a), NS(kv_cache_groups=[]), 0, 0)
    fb = mkeys.identity_fields(vllm_config("LBHNC", 16, model=b), NS(kv_cache_groups=[]), 0, 0)
    assert mkeys.identity_digest(fa) != mkeys.identity_digest(fb)


def test_cache_salt_requests_never_share_keys():
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(16, sha256)

    def req(salt: str | None) -> Any:
        return Request(
            request_id=f"r-{salt}",
            prompt_token_ids=list(range(64)),
            sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None,
            cache_salt=salt,
            block_hasher=hasher,
        )

    kv = make_vllm_kv("LBHNC")
    s, _ = _pair(kv)
    key = s._scheduler._key
    keys = {salt: [key(bytes(h)) for h in req(salt).block_hashes] for salt in ("alice", "bob", None)}
    assert len(keys["alice"]) == 4
    assert not set(keys["alice"]) & set(keys["bob"]) and not set(keys["alice"]) & set(keys[None])
    assert keys["alice"] == [key(bytes(h)) for h in req("alice").block_hashes]


def test_reset_cache_moves_to_a_new_epoch_and_clears_the_host_tier():
    kv = make_vllm_kv("LBHNC")
    s, w = _pair(kv)
    r1 = _req("r1", 35, 16)
    _admit(s, r1, [0, 1, 2])
    _step(s, w, r1, [0, 1, 2], 0)
    old = w._worker._key(r1.block_hashes[0])
    assert len(w._worker.executor.store_) == 2
    assert s.reset_cache() is True
    assert s.get_num_new_matched_tokens(_req("r2", 35, 16), 0) == (0, False)
    _step(s, w, _req("r3", 5, 16, tag=b"q"), [9], 0)  # the next step carries the reset
    assert len(w._worker.executor.store_) == 0
    assert w._worker._key(r1.block_hashes[0]) != old


# ---------------------------------------------------------------- configuration parity


def test_explicit_config_recomputes_failed_loads_unless_told_otherwise():
    kv = make_vllm_kv("LBHNC")
    _s, _ = _pair(kv)
    assert kv.vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"
    kv2 = make_vllm_kv("LBHNC")
    _pair(kv2, {"load_failure_policy": "fail"})
    assert kv2.vllm_config.kv_transfer_config.kv_load_failure_policy == "fail"


def test_env_and_extra_config_reach_the_same_settings(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    env = {
        "VLLM_MEMBRAIN_ENDPOINT": "ucx://a:1,tcp://b:2",
        "VLLM_MEMBRAIN_AUTH_TOKEN_FILE": str(tok),
        "VLLM_MEMBRAIN_REPLICAS": "2",
        "VLLM_MEMBRAIN_LOAD_FAILURE_POLICY": "fail",
    }
    extra = {
        "endpoint": "ucx://a:1,tcp://b:2",
        "auth_token_file": str(tok),
        "replicas": 2,
        "load_failure_policy": "fail",
    }
    a, b = mcfg.resolve({}, env=env), mcfg.resolve(extra, env={})
    assert a == b and a.endpoints == ["ucx://a:1", "tcp://b:2"] and a.auth_token() == "s3cret"
    assert mcfg.resolve(a.to_extra_config(), env={}) == a  # the plugin's round trip
    for bad in (
        {"replicas": 3},
        {"auth_token_file": str(tmp_path / "none")},
        {"load_failure_policy": "x"},
        {"typo": 1},
    ):
        with pytest.raises(mcfg.ConfigError):
            mcfg.resolve({**extra, **bad}, env={})
    tok.write_bytes(b"\xff\xfe")
    with pytest.raises(mcfg.ConfigError, match="UTF-8"):
        mcfg.resolve(extra, env={})


# ---------------------------------------------------------------- the rest of the contract


def test_hit_sources_events_delivery_and_stats_once_across_ranks(monkeypatch):
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    kv = make_vllm_kv("LBHNC")
    # Room for 2 blocks, LRU: r3's new blocks evict r1's (under the default slru, r1's blocks,
    # read again by r2, would be kept and r3's first-sight blocks not admitted).
    s, w = _pair(kv, {"cpu_cache_size": 2 * 2 * 16 * 128 * 2 * 2, "eviction_policy": "lru"})
    assert s.requires_kv_delivery is False
    r1 = _req("r1", 35, 16)
    _admit(s, r1, [0, 1, 2])
    _step(s, w, r1, [0, 1, 2], 0)
    ev = s.take_events()
    assert [type(e) for e in ev] == [BlockStored, BlockStored] and ev[0].ownership == "membrain-host"
    assert ev[0].token_ids == list(range(16)) and ev[1].token_ids == list(range(16, 32))
    assert ev[1].parent_block_hash == maybe_convert_block_hash(r1.block_hashes[0]) == ev[0].block_hashes[0]
    r2 = _req("r2", 35, 16)
    assert _admit(s, r2, [5, 6, 7]) == 32
    assert s.get_external_cache_hit_sources(r2, 32) == {CacheHitSource.HOST: 32}
    r3 = _req("r3", 35, 16, tag=b"z")
    _admit(s, r3, [8, 9, 10])
    _step(s, w, r3, [8, 9, 10], 0)  # its two new blocks evict r1's from the host tier
    assert any(isinstance(e, BlockRemoved) for e in s.take_events())
    s.reset_cache()
    assert any(isinstance(e, AllBlocksCleared) for e in s.take_events())
    lead = w.get_kv_connector_stats()
    assert lead is not None and lead.data["store_tokens_host"] > 0
    # A second TP rank moves the same blocks: bytes count, tokens and calls do not (vLLM sums ranks).
    import vllm.distributed.parallel_state as ps

    monkeypatch.setattr(ps, "get_tp_group", lambda: NS(rank_in_group=1))
    kv3 = make_vllm_kv("LBHNC")
    s3, w3 = _pair(kv3)
    _admit(s3, r1, [0, 1, 2])
    _step(s3, w3, r1, [0, 1, 2], 0)
    other = w3.get_kv_connector_stats()
    assert other is not None and other.data.get("store_bytes_host", 0) > 0
    assert "store_tokens_host" not in other.data and "stores" not in other.data


def test_request_priority_keeps_its_prefix_and_scheduler_stats_per_tier():
    # Host tier of 2 blocks. A request with kv_transfer_params={"membrain_priority": 1} stores a
    # 2-block prefix; a scan of other prompts (each read again, so protected under slru) evicts
    # everything else but not it. The scheduler's stats count lookups, hits per tier and
    # host evictions by reason.
    kv = make_vllm_kv("LBHNC")
    s, w = _pair(kv, {"cpu_cache_size": 2 * 2 * 16 * 128 * 2 * 2})
    sys_req = _req("sys", 35, 16, tag=b"s")
    sys_req.kv_transfer_params = {"membrain_priority": 1}
    _admit(s, sys_req, [0, 1, 2])
    _step(s, w, sys_req, [0, 1, 2], 0)
    for i in range(4):
        r = _req(f"scan{i}", 35, 16, tag=bytes([65 + i]))
        _admit(s, r, [3, 4, 5])
        _step(s, w, r, [3, 4, 5], 0)
    again = _req("again", 35, 16, tag=b"s")
    assert _admit(s, again, [6, 7, 8]) == 32  # both blocks from the host tier
    st = s.get_kv_connector_stats()
    assert st is not None
    d = st.reduce()
    assert (
        d["lookup_blocks"] == 6 * 2 and d["hit_blocks_host"] == 2 and d["hit_ratio_host"] == round(2 / 12, 4)
    )
    assert d.get("host_evicted_priority", 0) == 0
    assert s.get_kv_connector_stats() is None  # taken once
    # A bad per-request value falls back to the configured default instead of failing.
    bad = _req("bad", 35, 16, tag=b"q")
    bad.kv_transfer_params = {"membrain_priority": "high"}
    assert s._scheduler._priority(bad) == 0


def test_priority_and_policy_settings_are_validated():
    assert mcfg.resolve({"priority": 2, "eviction_policy": "LRU", "admission": "seen"}, env={}).priority == 2
    for bad in ({"priority": 4}, {"priority": "x"}, {"eviction_policy": "fifo"}, {"admission": "never"}):
        with pytest.raises(mcfg.ConfigError):
            mcfg.resolve(bad, env={})
