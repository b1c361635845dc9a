"""Drives MembrainConnector's scheduler and worker halves by hand, step by step, the way vLLM's
scheduler and model runner call them (not a test module: the connector tests import it).

``make_request`` is a stand-in for vLLM's Request with chained-looking block hashes; ``admit``
asks ``get_num_new_matched_tokens`` again while it answers None (a remote lookup in flight) and
allocates; ``step`` builds the step's metadata, starts loads, waits for their completion through
``get_finished`` then ``get_block_ids_with_load_errors`` (vLLM's order), and stores.
"""

from __future__ import annotations

import time
from types import SimpleNamespace as NS
from typing import Any


def make_request(rid: str, n_tokens: int, block_size: int, tag: bytes = b"p") -> Any:
    return NS(
        request_id=rid,
        num_tokens=n_tokens,
        num_prompt_tokens=n_tokens,
        all_token_ids=list(range(n_tokens)),
        block_hashes=[tag + bytes([i]) * 31 for i in range(n_tokens // block_size)],
    )


def matched(s, req, ncomp: int = 0, timeout_s: float = 10.0):
    """get_num_new_matched_tokens asked again every "step" while it answers None (a remote
    lookup in flight), as vLLM's scheduler does."""
    deadline = time.monotonic() + timeout_s
    while True:
        n, is_async = s.get_num_new_matched_tokens(req, ncomp)
        if n is not None or time.monotonic() > deadline:
            return n, is_async
        time.sleep(0.001)


def finish_loads(w, rids: set[str], finished: set[str] | None = None, timeout_s: float = 10.0) -> set[int]:
    """Steps the worker's completion calls (get_finished, then get_block_ids_with_load_errors,
    vLLM's order) until every load of ``rids`` is reported; returns the failed blocks."""
    errors: set[int] = set()
    left = set(rids)
    deadline = time.monotonic() + timeout_s
    while True:
        _sending, recving = w.get_finished(finished or set())
        finished = None
        errors |= w.get_block_ids_with_load_errors()
        left -= recving or set()
        if not left:
            return errors
        assert time.monotonic() < deadline, f"loads of {left} never reported"
        time.sleep(0.001)


def step(s, w, req, block_ids: list[int], ncomp: int):
    s._scheduler.kv_cache_manager = NS(get_block_ids=lambda rid: (block_ids,))
    return run_step(s, w, [(req.request_id, ncomp)], {req.request_id: req.num_tokens - ncomp})


def run_step(s, w, new: list[tuple[str, int]], scheduled: dict[str, int]):
    """One engine step for new requests ``(req_id, num_computed_tokens)``: the scheduler's
    metadata, the worker's loads (until they complete) and stores. Returns (meta, load errors)."""
    so = NS(
        scheduled_new_reqs=[NS(req_id=rid, num_computed_tokens=n) for rid, n in new],
        scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], resumed_req_ids=set()),
        num_scheduled_tokens=scheduled,
    )
    meta = s.build_connector_meta(so)
    w.bind_connector_metadata(meta)
    w.start_load_kv(None)
    errors = finish_loads(w, set(meta.loads))
    w.wait_for_save()
    w.clear_connector_metadata()
    return meta, errors


def admit(s, req, block_ids):
    n, is_async = matched(s, req)
    assert is_async is (n > 0)  # every load is asynchronous
    s.update_state_after_alloc(req, NS(get_block_ids=lambda: (block_ids,)), n)
    return n
