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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from membrain.client.breaker import CircuitBreaker
from membrain.tiers.backend import RemoteBackend, is_redis
from membrain.tiers.codec import Codec, parse_compression
from membrain.utils.affinity import enter_background

logger = logging.getLogger("membrain.tiers.remote")

# Data deadlines scale with the bytes moved: ``timeout_ms`` covers the round trip and the first
# MiB, every further MiB adds PER_MIB_MS (8 ms/MiB: a floor of ~125 MiB/s, far below any link
# Membrain runs on), so a long prefix never fails only because it is long.
PER_MIB_MS = 8


def deadline_ms(timeout_ms: int, nbytes: int) -> int:
    """The deadline of a transfer of ``nbytes``: ``timeout_ms + PER_MIB_MS`` per MiB beyond the
    first (rounded up)."""
    extra_mib = max(0, -(-int(nbytes) // 2**20) - 1)
    return int(timeout_ms) + PER_MIB_MS * extra_mib


def make_client(settings: Any) -> RemoteBackend | None:
    """The remote backend for :class:`~membrain.vllm.config.MembrainSettings`: a
    ``membrain.Client`` for Membrain servers (the default) or a
    :class:`~membrain.tiers.redis_backend.RedisBackend` for ``redis://``, ``rediss://`` and
    ``redis-cluster://`` endpoints (namespace, deadline, auth token file as the Redis password);
    None with a warning when it cannot be created (the remote tier is then off and every lookup
    a miss)."""
    try:
        if is_redis(settings.endpoints):
            from membrain.tiers.redis_backend import RedisBackend

            return RedisBackend(
                settings.endpoints,
                namespace=settings.namespace,
                timeout_ms=settings.timeout_ms,
                auth_token=settings.auth_token(),
            )
        from membrain.client import Client

        return Client(
            settings.endpoints,
            namespace=settings.namespace,
            timeout_ms=settings.timeout_ms,
            auth_token=settings.auth_token(),
            replicas=settings.replicas,
        )
    except Exception as e:  # a bad endpoint, an unreadable token file, redis-py missing
        logger.warning(
            "Membrain remote tier disabled: cannot create client for %s (%s)", settings.endpoints, e
        )
        return None


def make_codec(settings: Any, elem_size: int = 2) -> Codec | None:
    """The wire codec for ``settings.compression`` (None when off or unavailable)."""
    try:
        spec = parse_compression(getattr(settings, "compression", ""))
        return Codec(spec[1], elem_size) if spec else None
    except Exception as e:
        logger.warning("Membrain wire compression disabled (%s)", e)
        return None


class RemoteTier:
    """Exception-proof wrapper with the remote tier's circuit breaker
    (:class:`~membrain.client.breaker.CircuitBreaker`): after a call fails the remote is
    skipped (an instant miss) for a backoff that doubles up to ``max_backoff_s``, one probe at a
    time, so a broken backend costs one failed call per backoff period, not one per request.
    Slow successes do not open it (the client's deadline bounds them)."""

    def __init__(
        self,
        client: Any,
        max_inflight: int = 256,
        timeout_ms: int = 2000,
        backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
        codec: Codec | None = None,
        codec_threads: int = 2,
    ) -> None:
        self.client = client
        # Optional wire compression (membrain.tiers.codec): values are encoded on the codec
        # threads before the backend sees them; reads fetch the stored bytes (client.get) and
        # decode them into the caller's buffers there.
        self.codec = codec
        self._codec_pool = (
            ThreadPoolExecutor(
                max_workers=max(1, codec_threads),
                thread_name_prefix="membrain-codec",
                initializer=enter_background,
            )
            if codec is not None
            else None
        )
        self.max_inflight = max_inflight
        self.timeout_ms = timeout_ms
        self._breaker = CircuitBreaker(backoff_s, max_backoff_s)
        self._lock = threading.Lock()
        self._inflight = 0
        self._warned = False
        # Breaker activity since the last take_breaker_counts(), for connector stats / alerts:
        # how often it opened, and how many calls it answered as a miss without trying.
        self._opened = 0
        self._skipped = 0

    def _failed(self, what: str, e: BaseException | str, probe: bool) -> None:
        if not self._warned:
            logger.warning("Membrain remote %s failed (%s); treating as miss, retrying later", what, e)
            self._warned = True
        was_open = self._breaker.is_open
        self._breaker.failure(probe=probe)
        if not was_open:
            with self._lock:
                self._opened += 1

    def _settled(self, what: str, probe: bool) -> None:
        """A call returned: a success, unless the backend answered misses only because every
        endpoint it has is down (membrain.Client does not raise for that). Counting it as a
        failure opens this breaker, so a hung server costs one probe per backoff period (up to
        ``max_backoff_s``), not one per endpoint backoff (up to 5 s), each stalling a request's
        lookup for up to the connect timeout."""
        if getattr(self.client, "all_down", False):
            self._failed(what, "every endpoint is down", probe)
        else:
            self._succeeded()

    def _succeeded(self) -> None:
        self._breaker.success()
        if self._warned:
            logger.info("Membrain remote reachable again")
            self._warned = False

    def take_breaker_counts(self) -> tuple[int, int]:
        """(times the breaker opened, calls skipped while it was open) since the last call."""
        with self._lock:
            out = (self._opened, self._skipped)
            self._opened = self._skipped = 0
            return out

    @property
    def available(self) -> bool:
        """Whether a call now would reach the backend (breaker closed or a probe due)."""
        return self._breaker.allows_attempt()

    def _call(self, what: str, fn: Callable[[], Any], fallback: Any) -> Any:
        state = self._breaker.admit()
        if state == "open":
            with self._lock:
                self._skipped += 1
            return fallback
        try:
            res = fn()
        except Exception as e:
            self._failed(what, e, probe=state == "probe")
            return fallback
        self._settled(what, probe=state == "probe")
        return res

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        n = self._call("lookup", lambda: int(self.client.lookup_prefix(list(keys))), 0)
        return max(0, min(int(n), len(keys)))

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any], nbytes: int = 0) -> list[bool]:
        """Fetches ``keys`` into ``buffers``; ``nbytes`` (the bytes asked for) scales the
        deadline (:func:`deadline_ms`)."""
        if not keys:
            return []
        ms = deadline_ms(self.timeout_ms, nbytes)
        if self.codec is not None:
            return self._get_decoded(keys, buffers, ms)
        res = self._call(
            "get", lambda: list(self.client.get_into(list(keys), list(buffers), timeout_ms=ms)), None
        )
        if res is None or len(res) != len(keys):
            return [False] * len(keys)
        return [bool(r) for r in res]

    def _get_decoded(self, keys: Sequence[bytes], buffers: Sequence[Any], timeout_ms: int) -> list[bool]:
        codec, pool = self.codec, self._codec_pool
        assert codec is not None and pool is not None
        stored = self._call("get", lambda: list(self.client.get(list(keys), timeout_ms=timeout_ms)), None)
        if stored is None or len(stored) != len(keys):
            return [False] * len(keys)
        bufs = list(buffers)

        def one(i: int) -> bool:
            return stored[i] is not None and codec.decode_into(stored[i], bufs[i])

        try:
            return list(pool.map(one, range(len(keys))))
        except Exception:
            return [False] * len(keys)

    def _put_encoded(self, keys: list[bytes], values: list[Any], timeout_ms: int) -> Future[Any]:
        """Encodes on a codec thread, then hands the encoded values to the backend."""
        codec, pool = self.codec, self._codec_pool
        assert codec is not None and pool is not None
        out: Future[Any] = Future()

        def relay(f: Future[Any]) -> None:
            try:
                out.set_result(f.result())
            except BaseException as e:
                out.set_exception(e)

        def work() -> None:
            try:
                enc = [codec.encode(v) for v in values]
                inner = self.client.put_async(keys, enc, timeout_ms=timeout_ms)
            except BaseException as e:
                out.set_exception(e)
                return
            inner.add_done_callback(relay)

        pool.submit(work)
        return out

    @property
    def inflight(self) -> int:
        return self._inflight

    def put_async(
        self,
        keys: Sequence[bytes],
        values: Sequence[Any],
        done: Callable[[list[bool]], None] | None = None,
        nbytes: int = 0,
    ) -> bool:
        """Ships ``values`` without waiting; ``done(results)`` runs when finished (also on
        error, with all False). Returns False (and does nothing) when too many are in flight.
        ``nbytes`` scales the deadline (:func:`deadline_ms`)."""
        n = len(keys)
        if n == 0:
            return True
        with self._lock:
            if self._inflight + n > self.max_inflight:
                return False
            self._inflight += n
        state = self._breaker.admit()
        if state == "open":
            with self._lock:
                self._inflight -= n
                self._skipped += 1
            return False
        probe = state == "probe"

        def finish(fut: Future[Any] | None, err: BaseException | None = None) -> None:
            try:
                res = [False] * n
                if fut is not None:
                    try:
                        r = fut.result()
                        res = [bool(x) for x in r] if r is not None and len(r) == n else [True] * n
                        self._settled("put", probe)
                    except Exception as e:
                        self._failed("put", e, probe)
                elif err is not None:
                    self._failed("put", err, probe)
            finally:
                with self._lock:
                    self._inflight -= n
            if done is not None:
                done(res)

        try:
            ms = deadline_ms(self.timeout_ms, nbytes)
            if self.codec is not None:
                fut = self._put_encoded(list(keys), list(values), ms)
            else:
                fut = self.client.put_async(list(keys), list(values), timeout_ms=ms)
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
        if self._codec_pool is not None:
            self._codec_pool.shutdown(wait=True)
        try:
            self.client.close()
        except Exception:
            pass
