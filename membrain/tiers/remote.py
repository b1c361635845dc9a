"""Remote tier: Membrain servers behind a client object.

The client (``membrain.Client`` or any object with the same API: ``lookup_prefix``, ``get_into``,
``put_async``) never fails hard by contract; this wrapper still turns every exception into a miss
so a broken remote can only cost a recompute, never a failed request.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

logger = logging.getLogger("membrain.tiers.remote")


def make_client(endpoints: list[str], namespace: str, timeout_ms: int) -> Any | None:
    """A real ``membrain.Client``, or None (with a warning) when it cannot be created."""
    try:
        from membrain import Client  # type: ignore[attr-defined]

        return Client(endpoints, namespace=namespace, timeout_ms=timeout_ms)
    except Exception as e:  # ImportError until the client lands, or a bad endpoint
        logger.warning("Membrain remote tier disabled: cannot create client for %s (%s)", endpoints, e)
        return None


class RemoteTier:
    def __init__(self, client: Any, max_inflight: int = 256) -> None:
        self.client = client
        self.max_inflight = max_inflight
        self._lock = threading.Lock()
        self._inflight = 0
        self._warned = False

    def _warn(self, what: str, e: BaseException) -> None:
        if not self._warned:
            logger.warning("Membrain remote %s failed (%s); treating as miss", what, e)
            self._warned = True

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        try:
            n = int(self.client.lookup_prefix(list(keys)))
            return max(0, min(n, len(keys)))
        except Exception as e:
            self._warn("lookup", e)
            return 0

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[bool]:
        if not keys:
            return []
        try:
            res = list(self.client.get_into(list(keys), list(buffers)))
            if len(res) != len(keys):
                return [False] * len(keys)
            return [bool(r) for r in res]
        except Exception as e:
            self._warn("get", e)
            return [False] * len(keys)

    @property
    def inflight(self) -> int:
        return self._inflight

    def put_async(self, keys: Sequence[bytes], values: Sequence[Any],
                  done: Callable[[list[bool]], None] | None = None) -> bool:
        """Ships ``values`` without waiting; ``done(results)`` runs when finished (also on
        error, with all False). Returns False (and does nothing) when too many are in flight."""
        n = len(keys)
        if n == 0:
            return True
        with self._lock:
            if self._inflight + n > self.max_inflight:
                return False
            self._inflight += n

        def finish(fut: Future | None, err: BaseException | None = None) -> None:
            try:
                res = [False] * n
                if fut is not None:
                    try:
                        r = fut.result()
                        res = [bool(x) for x in r] if r is not None and len(r) == n else [True] * n
                    except Exception as e:
                        self._warn("put", e)
                elif err is not None:
                    self._warn("put", err)
            finally:
                with self._lock:
                    self._inflight -= n
            if done is not None:
                done(res)

        try:
            fut = self.client.put_async(list(keys), list(values))
        except Exception as e:
            finish(None, e)
            return True
        fut.add_done_callback(finish)
        return True

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
