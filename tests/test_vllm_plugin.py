"""The vLLM general plugin and start-up validation, in-process (imports vLLM, no engine)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm


@pytest.fixture()
def fresh_plugin(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    import membrain.vllm.plugin as plugin

    original = EngineArgs.create_engine_config
    monkeypatch.setattr(plugin, "_patched", False)
    yield plugin
    EngineArgs.create_engine_config = original


def test_disabled_means_untouched(fresh_plugin, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv("VLLM_MEMBRAIN_ENABLED", raising=False)
    before = EngineArgs.create_engine_config
    fresh_plugin.register()
    assert EngineArgs.create_engine_config is before


def test_enabled_sets_kv_transfer_config_and_bad_values_fail(fresh_plugin, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from membrain.vllm.config import ConfigError

    monkeypatch.setenv("VLLM_MEMBRAIN_ENABLED", "1")
    fresh_plugin.register()
    assert EngineArgs.create_engine_config.__module__ == "membrain.vllm.plugin"
    d = fresh_plugin.kv_transfer_config_dict()
    assert d["kv_connector"] == "MembrainConnector" and d["kv_load_failure_policy"] == "recompute"
    monkeypatch.setenv("VLLM_MEMBRAIN_ENDPOINT", "redis://nowhere")
    with pytest.raises(ConfigError, match="redis://nowhere"):
        EngineArgs(model="unused").create_engine_config()
    monkeypatch.setenv("VLLM_MEMBRAIN_ENDPOINT", "tcp://h:1")
    monkeypatch.setenv("VLLM_MEMBRAIN_CPU_CACHE_SIZE", "plenty")
    with pytest.raises(ConfigError, match="plenty"):
        EngineArgs(model="unused").create_engine_config()


def test_env_names_known_to_vllm(fresh_plugin, monkeypatch):
    from vllm import envs

    monkeypatch.setenv("VLLM_MEMBRAIN_ENABLED", "1")
    fresh_plugin.register()
    assert "VLLM_MEMBRAIN_ENDPOINT" in envs.environment_variables


def test_membrain_logs_reach_vllms_handler(monkeypatch):
    """The tiers log under membrain.* (host-tier prefault, remote health); inside vLLM those
    lines must land where vLLM's own go, at vLLM's level, unless the application configured
    the membrain logger itself."""
    import logging

    from membrain.vllm import connector

    theirs, ours = logging.getLogger("vllm"), logging.getLogger("membrain")
    handler = logging.StreamHandler()
    monkeypatch.setattr(theirs, "handlers", [handler])
    monkeypatch.setattr(theirs, "level", logging.INFO)
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    monkeypatch.setattr(ours, "propagate", True)
    connector._route_membrain_logs_to_vllm()
    assert ours.handlers == [handler] and not ours.propagate
    assert logging.getLogger("membrain.tiers.host").isEnabledFor(logging.INFO)

    mine = logging.NullHandler()
    monkeypatch.setattr(ours, "handlers", [mine])
    connector._route_membrain_logs_to_vllm()
    assert ours.handlers == [mine]
