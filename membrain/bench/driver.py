"""Runs one vLLM instance on token prompts and writes tokens and timings as JSON.

Usage: python -m membrain.bench.driver SPEC.json OUT.json

SPEC keys: model, prompts (list of token-id lists), max_tokens, kv_cache_memory_bytes,
membrain ("off" | "env" | "explicit"), extra (kv_connector_extra_config for "explicit"),
repeat (serve the prompts this many times in a row, default 1), block_size (optional),
kill_pid_after_first_pass (SIGKILL this pid after the first pass: a server dying mid-run).
Each prompt is one ``generate`` call, so its wall time is its latency (TTFT + max_tokens-1 steps).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    spec = json.load(open(argv[0]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs: dict = dict(
        model=spec["model"],
        enforce_eager=True,
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=int(spec.get("kv_cache_memory_bytes", 256 << 20)),
        max_model_len=int(spec.get("max_model_len", 4096)),
        seed=0,
        max_num_batched_tokens=int(spec.get("max_num_batched_tokens", 8192)),
    )
    if spec.get("block_size"):
        kwargs["block_size"] = int(spec["block_size"])
    if spec.get("membrain") == "explicit":
        from membrain.vllm.plugin import kv_transfer_config_dict

        kwargs["kv_transfer_config"] = kv_transfer_config_dict(spec.get("extra") or {})
    llm = LLM(**kwargs)
    sp = SamplingParams(max_tokens=int(spec.get("max_tokens", 8)), temperature=0.0, detokenize=False)
    results = []
    for rep in range(int(spec.get("repeat", 1))):
        if rep == 1 and spec.get("kill_pid_after_first_pass"):
            import os
            import signal

            os.kill(int(spec["kill_pid_after_first_pass"]), signal.SIGKILL)
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
                }
            )
    json.dump({"results": results}, open(argv[1], "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
