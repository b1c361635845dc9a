"""Runs one vLLM instance on token prompts and writes tokens and timings as JSON.

Usage: python -m membrain.bench.driver SPEC.json OUT.json

SPEC keys: model, prompts (list of token-id lists), max_tokens, kv_cache_memory_bytes,
membrain ("off" | "env" | "explicit"), extra (kv_connector_extra_config for "explicit"),
repeat (serve the prompts this many times in a row, default 1), block_size (optional),
tensor_parallel_size (optional),
kill_pid_after_first_pass (SIGKILL this pid after the first pass: a server dying mid-run),
sleep_after_kill_s (then wait this long, e.g. past a Redis cluster's node timeout),
dump_kv_after_pass (after that pass, write the SHA-256 of every non-zero KV block of the
worker's cache, all layers packed through vLLM's own tensors, into OUT's ``kv_block_digests``).
OUT's ``engine`` says what vLLM resolved (``hybrid_kv_cache_manager``: HMA on).
Each result carries ``cached_tokens``: the tokens vLLM took from any cache (its own prefix cache
plus a connector's), so a run can be compared with vLLM's own path at the same cached length.
Each prompt is one ``generate`` call, so its wall time is its latency (TTFT + max_tokens-1 steps).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def _kv_block_digests(worker: Any) -> list[str]:
    """Runs on each worker: digests of the non-zero blocks of its KV cache, each block's layers
    concatenated in layer order through vLLM's own per-layer tensors (never membrain.ops)."""
    import hashlib

    import torch

    caches = [t for t in worker.model_runner.kv_caches if isinstance(t, torch.Tensor)]
    out = []
    for b in range(caches[0].shape[0]):
        pages = [t[b].contiguous().view(torch.uint8).reshape(-1).cpu() for t in caches]
        if not any(bool(p.any()) for p in pages):
            continue  # never written: every empty block would match every other one
        h = hashlib.sha256()
        for p in pages:
            h.update(p.numpy().tobytes())
        out.append(h.hexdigest())
    return out


def main(argv: list[str]) -> int:
    spec = json.load(open(argv[0]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = {
        "model": spec["model"],
        "enforce_eager": True,
        "skip_tokenizer_init": True,
        "kv_cache_memory_bytes": int(spec.get("kv_cache_memory_bytes", 256 << 20)),
        "max_model_len": int(spec.get("max_model_len", 4096)),
        "seed": 0,
        "max_num_batched_tokens": int(spec.get("max_num_batched_tokens", 8192)),
    }
    if spec.get("block_size"):
        kwargs["block_size"] = int(spec["block_size"])
    if spec.get("tensor_parallel_size"):
        kwargs["tensor_parallel_size"] = int(spec["tensor_parallel_size"])
    if spec.get("membrain") == "explicit":
        from membrain.vllm.plugin import kv_transfer_config_dict

        kwargs["kv_transfer_config"] = kv_transfer_config_dict(spec.get("extra") or {})
    if spec.get("dump_kv_after_pass") is not None:
        # The digest function travels to the workers pickled (test and benchmark harness only).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    llm = LLM(**kwargs)
    sp = SamplingParams(max_tokens=int(spec.get("max_tokens", 8)), temperature=0.0, detokenize=False)
    results = []
    digests: list[str] = []
    for rep in range(int(spec.get("repeat", 1))):
        if rep == 1 and spec.get("kill_pid_after_first_pass"):
            os.kill(int(spec["kill_pid_after_first_pass"]), signal.SIGKILL)
            time.sleep(float(spec.get("sleep_after_kill_s", 0)))
        for i, p in enumerate(spec["prompts"]):
            t0 = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            results.append(
                {
                    "rep": rep,
                    "prompt": i,
                    "tokens": list(out[0].outputs[0].token_ids),
                    "seconds": dt,
                    "prompt_tokens": len(p),
                    "cached_tokens": int(out[0].num_cached_tokens or 0),
                }
            )
        if spec.get("dump_kv_after_pass") == rep:
            digests = sorted({d for w in llm.collective_rpc(_kv_block_digests) for d in w})
    engine: dict[str, Any] = {}
    try:  # what vLLM resolved: is its hybrid KV-cache manager on (HMA)?
        sc = llm.llm_engine.vllm_config.scheduler_config
        engine["hybrid_kv_cache_manager"] = not bool(sc.disable_hybrid_kv_cache_manager)
        engine["block_size"] = int(llm.llm_engine.vllm_config.cache_config.block_size)
    except Exception:
        pass
    json.dump({"results": results, "kv_block_digests": digests, "engine": engine}, open(argv[1], "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
