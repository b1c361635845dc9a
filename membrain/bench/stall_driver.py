"""Child process of ``membrain bench stall``: one vLLM async engine, one decoding stream, and a
long-prefix request arriving mid-stream; writes per-token timestamps as JSON.

Usage: python -m membrain.bench.stall_driver SPEC.json OUT.json

SPEC keys: model, kv_cache_memory_bytes, max_model_len, max_num_batched_tokens, membrain ("off" |
"explicit"), extra (kv_connector_extra_config), decode_prompt (token ids), decode_tokens (the
most tokens the stream generates), arrive_after (stream tokens before the long request is sent),
tail_tokens (stream tokens after the long request's first token), long_prompts (token-id lists,
sent one per phase, each while a fresh decoding stream runs).

Each phase: a decoding stream starts (``DELTA`` outputs: one timestamp per token, taken when the
token reaches this process); after ``arrive_after`` of its tokens the phase's long request is
sent (``max_tokens=1``); the stream is stopped (aborted) ``tail_tokens`` tokens after the long
request's first token, so it covers the whole wait however long the load takes (or ends at
``decode_tokens``; one that ended before that first token is reported as too short to judge). Phase 1 of the benchmark is the
long prompt served from Membrain (or computed cold), phase 2 the same prompt again: vLLM's own
prefix-cache hit, the reference for the step that computes the request's remaining tokens.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any


async def _stream(
    engine: Any,
    prompt: list[int],
    max_tokens: int,
    rid: str,
    stamps: list[float],
    until: Callable[[], bool] | None = None,
) -> None:
    """Generates up to ``max_tokens`` tokens of ``prompt``, a timestamp per token in ``stamps``;
    stops early (vLLM aborts the request) once ``until()`` is true."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    sp = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=max_tokens,
        temperature=0.0,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )
    gen = engine.generate(TokensPrompt(prompt_token_ids=prompt), sp, rid)
    try:
        async for out in gen:
            now = time.perf_counter()
            stamps.extend([now] * len(out.outputs[0].token_ids))
            if until is not None and until():
                break
    finally:
        await gen.aclose()  # an early stop aborts the request in the engine


async def _phase(engine: Any, spec: dict[str, Any], long_prompt: list[int], tag: str) -> dict[str, Any]:
    stamps: list[float] = []
    first: list[float] = []
    tail = int(spec.get("tail_tokens", 20))

    def covered() -> bool:  # the stream ran on past the long request's first token
        return bool(first) and sum(1 for t in stamps if t > first[0]) >= tail

    decode = asyncio.create_task(
        _stream(engine, spec["decode_prompt"], int(spec["decode_tokens"]), f"decode-{tag}", stamps, covered)
    )
    while len(stamps) < int(spec["arrive_after"]):
        if decode.done():
            decode.result()  # raises the stream's error
            raise RuntimeError("the decoding stream ended before the long request arrived")
        await asyncio.sleep(0.001)
    arrive = time.perf_counter()
    await _stream(engine, long_prompt, 1, f"long-{tag}", first)
    await decode
    return {"decode_stamps": stamps, "long_arrive": arrive, "long_first_token": first[0] if first else None}


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs: dict[str, Any] = {
        "model": spec["model"],
        "enforce_eager": True,
        "skip_tokenizer_init": True,
        "kv_cache_memory_bytes": int(spec["kv_cache_memory_bytes"]),
        "max_model_len": int(spec["max_model_len"]),
        "max_num_batched_tokens": int(spec["max_num_batched_tokens"]),
        "seed": 0,
    }
    if spec.get("membrain") == "explicit":
        from membrain.vllm.plugin import kv_transfer_config_dict

        kwargs["kv_transfer_config"] = kv_transfer_config_dict(spec.get("extra") or {})
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    try:
        # Warm-up: the first steps of a fresh engine are slower than the rest.
        await _stream(engine, spec["decode_prompt"][:32], 8, "warmup", [])
        phases = [await _phase(engine, spec, p, str(i)) for i, p in enumerate(spec["long_prompts"])]
    finally:
        engine.shutdown()
    return {"phases": phases}


def main(argv: list[str]) -> int:
    spec = json.load(open(argv[0]))
    out = asyncio.run(_main(spec))
    json.dump(out, open(argv[1], "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
