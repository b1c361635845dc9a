"""Remote tier: Membrain servers behind a client object.

The client (``membrain.Client`` or any object with the same API: ``lookup_prefix``, ``get_into``,
``put_async``) never fails hard by contract; this wrapper still turns every exception into a miss
so a broken remote can only cost a recompute, never a failed request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

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
    """Exception-proof wrapper with a circuit breaker: after a failed or deadline-long call the
    remote is skipped (an instant miss) for a back-off that doubles up to ``max_backoff_s``, so
    a dead or black-holed server costs at most one timeout per back-off period, not one per
    request."""

    def __init__(
        self,
        client: Any,
        max_inflight: int = 256,
        timeout_ms: int = 2000,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.client = client
        self.max_inflight = max_inflight
        self._slow_s = 0.8 * timeout_ms / 1000.0
        self._backoff0, self._backoff_max = backoff_s, max_backoff_s
        self._backoff = backoff_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._inflight = 0
        self._warned = False

    def _warn(self, what: str, e: BaseException | str) -> None:
        if not self._warned:
            logger.warning("Membrain remote %s failed (%s); treating as miss, retrying later", what, e)
            self._warned = True

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _trip(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)

    def _ok(self) -> None:
        if self._backoff != self._backoff0:
            with self._lock:
                self._backoff = self._backoff0
            if self._warned:
                logger.info("Membrain remote reachable again")
                self._warned = False

    def _call(self, what: str, fn: Callable[[], Any], fallback: Any) -> Any:
        if not self.available:
            return fallback
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as e:
            self._warn(what, e)
            self._trip()
            return fallback
        if time.monotonic() - t0 >= self._slow_s:
            self._warn(what, "call took the whole deadline")
            self._trip()
        else:
            self._ok()
        return res

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        n = self._call("lookup", lambda: int(self.client.lookup_prefix(list(keys))), 0)
        return max(0, min(int(n), len(keys)))

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[bool]:
        if not keys:
            return []
        res = self._call("get", lambda: list(self.client.get_into(list(keys), list(buffers))), None)
        if res is None or len(res) != len(keys):
            return [False] * len(keys)
        return [bool(r) for r in res]

    @property
    def inflight(self) -> int:
        return self._inflight

    def put_async(
        self, keys: Sequence[bytes], values: Sequence[Any], done: Callable[[list[bool]], None] | None = None
    ) -> bool:
        """Ships ``values`` without waiting; ``done(results)`` runs when finished (also on
        error, with all False). Returns False (and does nothing) when too many are in flight."""
        n = len(keys)
        if n == 0:
            return True
        if not self.available:
            return False
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
                        self._trip()
                elif err is not None:
                    self._warn("put", err)
                    self._trip()
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

    def drain(self, timeout_s: float) -> bool:
        """Waits (up to ``timeout_s``) for in-flight puts; True when none is left."""
        deadline = time.monotonic() + timeout_s
        while self._inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._inflight == 0

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
