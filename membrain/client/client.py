"""membrain.Client: the Python face of the remote tier.

Policy lives here (placement, replicas, fallback, circuit breaking, deadlines); every byte moves
in C++ (``membrain._native.Connection``), which releases the GIL while it does.

Failure model: the cache is an optimisation, so transport failures never reach the caller. A
server that is down, slow, restarting or sending corrupt data makes its keys *misses* (False /
None / 0) within the call's deadline; bad arguments (wrong types, key lengths, count mismatches)
raise immediately.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from membrain import _native
from membrain.client.breaker import CircuitBreaker
from membrain.client.endpoints import Endpoint, parse_endpoints
from membrain.client.placement import Rendezvous
from membrain.client.pool import ConnectionPool
from membrain.utils.affinity import enter_background

if TYPE_CHECKING:
    from membrain.client.pool import NativeConnection

T = TypeVar("T")
log = logging.getLogger("membrain.client")
MAX_KEY_LEN = 128
_OK = _native.STATUS_OK


class _Failed:
    """Marks a per-endpoint call that did not happen or did not complete."""

    __repr__ = lambda self: "<failed>"  # noqa: E731


FAILED = _Failed()


def _norm_keys(keys: Sequence[Any]) -> list[bytes]:
    if isinstance(keys, (bytes, bytearray, str, memoryview)):
        raise TypeError("keys must be a sequence of keys, not a single key")
    out: list[bytes] = []
    for i, k in enumerate(keys):
        if isinstance(k, bytes):
            b = k
        elif isinstance(k, str):
            b = k.encode()
        elif isinstance(k, (bytearray, memoryview)):
            b = bytes(k)
        else:
            raise TypeError(f"key {i} must be bytes or str, got {type(k).__name__}")
        if not 1 <= len(b) <= MAX_KEY_LEN:
            raise ValueError(f"key {i} is {len(b)} bytes; keys must be 1..{MAX_KEY_LEN} bytes")
        out.append(b)
    return out


def _check_buffers(bufs: Sequence[Any], n: int, what: str, writable: bool) -> list[Any]:
    bufs = list(bufs)
    if len(bufs) != n:
        raise ValueError(f"{n} keys but {len(bufs)} {what}s")
    for i, b in enumerate(bufs):
        try:
            m = memoryview(b)
        except TypeError:
            raise TypeError(f"{what} {i} ({type(b).__name__}) does not support the buffer protocol") from None
        if not m.c_contiguous:
            raise ValueError(f"{what} {i} is not C-contiguous")
        if writable and m.readonly:
            raise ValueError(f"{what} {i} is read-only")
    return bufs


class Client:
    """Client of one or more Membrain servers.

    Args:
        endpoints: ``"tcp://host:port"``, a comma-separated list, or a list of such strings
            (``http://`` is accepted as a synonym of ``tcp://``).
        namespace: keys of different namespaces never collide (1-64 of ``[A-Za-z0-9._-]``).
        timeout_ms: default deadline of every call (per-call ``timeout_ms=`` overrides it).
        auth_token: presented in HELLO when the servers require one.
        replicas: each key is written to this many distinct servers (top-R rendezvous);
            reads try them in order on miss, failure or checksum mismatch.
        connect_timeout_ms: cap on connect + HELLO (further capped by the call's deadline).
        breaker_base_s / breaker_max_s: backoff of a failed server before it is probed again.
        max_idle: idle connections kept per server.

    Thread-safe: any number of threads may share one Client. Async variants
    (``*_async``) return ``concurrent.futures.Future``; their deadline runs from when the
    operation starts.
    """

    def __init__(
        self,
        endpoints: str | Iterable[str],
        namespace: str = "default",
        timeout_ms: int = 2000,
        auth_token: str | None = None,
        replicas: int = 1,
        *,
        connect_timeout_ms: int = 1000,
        breaker_base_s: float = 0.05,
        breaker_max_s: float = 5.0,
        max_idle: int = 8,
        io_threads: int = 16,
        async_threads: int = 4,
    ) -> None:
        self.endpoints: list[Endpoint] = parse_endpoints(endpoints)
        if timeout_ms <= 0 or connect_timeout_ms <= 0:
            raise ValueError("timeout_ms and connect_timeout_ms must be positive")
        if not 1 <= replicas <= len(self.endpoints):
            raise ValueError(
                f"replicas must be 1..{len(self.endpoints)} (the number of endpoints), got {replicas}"
            )
        if (
            not isinstance(namespace, str)
            or not 1 <= len(namespace) <= 64
            or not all(c.isascii() and (c.isalnum() or c in "._-") for c in namespace)
        ):
            raise ValueError(f"namespace must be 1..64 characters of [A-Za-z0-9._-], got {namespace!r}")
        self.namespace = namespace
        self.timeout_ms = int(timeout_ms)
        self.replicas = int(replicas)
        self._placement = Rendezvous([str(e) for e in self.endpoints])
        self._pools = [
            ConnectionPool(e, namespace, auth_token, connect_timeout_ms, max_idle) for e in self.endpoints
        ]
        self._breakers = [CircuitBreaker(breaker_base_s, breaker_max_s) for _ in self.endpoints]
        # Two executors so fan-out work (which never submits further work) can never be
        # starved by async callers waiting on it.
        # Background threads (see membrain.utils.affinity): off an engine's compute cores.
        self._io = ThreadPoolExecutor(
            max_workers=max(2, io_threads), thread_name_prefix="membrain-io", initializer=enter_background
        )
        self._async = ThreadPoolExecutor(
            max_workers=max(1, async_threads),
            thread_name_prefix="membrain-async",
            initializer=enter_background,
        )
        self._closed = False
        self._close_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def _deadline(self, timeout_ms: int | None) -> float:
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        if ms <= 0:
            raise ValueError("timeout_ms must be positive")
        return time.monotonic() + ms / 1000.0

    @staticmethod
    def _left_ms(deadline: float) -> int:
        return int((deadline - time.monotonic()) * 1000)

    def _call(
        self, ep: int, fn: Callable[[NativeConnection, int], T], deadline: float, force: bool = False
    ) -> T | _Failed:
        """Runs ``fn(conn, timeout_ms)`` on endpoint ``ep`` within the deadline, or returns
        FAILED (breaker open, unreachable, timed out, broken stream)."""
        if self._closed:
            return FAILED
        breaker = self._breakers[ep]
        state = breaker.admit()
        if state == "open":
            if not force:
                return FAILED
            state = "probe"
        left = self._left_ms(deadline)
        if left <= 0:
            if state == "probe":
                breaker.release_probe()
            return FAILED
        pool = self._pools[ep]
        try:
            conn, reused = pool.acquire(left)
        except ConnectionError as e:
            self._mark_failed(ep, state, e)
            return FAILED
        for attempt in range(2):
            try:
                if state == "probe":
                    conn.ping(timeout_ms=max(1, self._left_ms(deadline)))
                result = fn(conn, max(1, self._left_ms(deadline)))
            except ConnectionError as e:
                pool.flush()
                # An idle connection may simply be stale (the server restarted since it was
                # used); one fresh attempt tells a restart from an outage. Not after a timeout:
                # the deadline is spent.
                left = self._left_ms(deadline)
                if attempt == 0 and reused and "timed out" not in str(e) and left > 0:
                    try:
                        conn, reused = pool.acquire(left)
                        continue
                    except ConnectionError:
                        pass
                self._mark_failed(ep, state, e)
                return FAILED
            pool.release(conn)
            if state != "closed" or breaker.failures:
                if breaker.failures:
                    log.info("membrain endpoint %s is back", self.endpoints[ep])
                breaker.success()
            return result
        return FAILED  # unreachable

    def _mark_failed(self, ep: int, state: str, err: BaseException) -> None:
        breaker = self._breakers[ep]
        was_open = breaker.is_open
        breaker.failure(probe=state == "probe")
        if not was_open:
            # Once per outage: its keys are misses until a probe succeeds.
            log.warning(
                "membrain endpoint %s marked down (%s); retrying in %.2fs",
                self.endpoints[ep],
                err,
                breaker.retry_in(),
            )

    def _fanout(
        self,
        groups: dict[int, list[int]],
        fn: Callable[[NativeConnection, int, list[int]], T],
        deadline: float,
    ) -> dict[int, T | _Failed]:
        """Runs ``fn(conn, timeout_ms, indices)`` on each endpoint in parallel (the first one
        inline in the calling thread)."""
        items = list(groups.items())
        if not items:
            return {}
        futures = [
            (ep, self._io.submit(self._call, ep, lambda c, ms, idx=idx: fn(c, ms, idx), deadline))
            for ep, idx in items[1:]
        ]
        ep0, idx0 = items[0]
        out: dict[int, T | _Failed] = {ep0: self._call(ep0, lambda c, ms: fn(c, ms, idx0), deadline)}
        for ep, fut in futures:
            out[ep] = fut.result()
        return out

    def _group(self, keys: list[bytes], indices: Iterable[int], rank: int) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        if len(self.endpoints) == 1:
            groups[0] = list(indices)
            return groups
        for i in indices:
            groups.setdefault(self._placement.ranked(keys[i])[rank], []).append(i)
        return groups

    def _read_rounds(
        self,
        keys: list[bytes],
        deadline: float,
        op: Callable[[NativeConnection, int, list[int]], list[Any]],
        is_hit: Callable[[Any], bool],
        store: Callable[[int, Any], None],
    ) -> None:
        """Asks each key's replicas in rank order until one has it (parallel per round)."""
        pending = list(range(len(keys)))
        for rank in range(self.replicas):
            if not pending:
                return
            groups = self._group(keys, pending, rank)
            retry: list[int] = []
            for ep, res in self._fanout(groups, op, deadline).items():
                if isinstance(res, _Failed):
                    retry.extend(groups[ep])
                    continue
                for i, r in zip(groups[ep], res):
                    if is_hit(r):
                        store(i, r)
                    else:
                        retry.append(i)
            pending = retry

    # ------------------------------------------------------------------ operations

    def put(self, keys: Sequence[Any], values: Sequence[Any], timeout_ms: int | None = None) -> list[bool]:
        """Store ``values`` (any C-contiguous buffer-protocol objects) under ``keys``.
        Returns per key whether at least one replica stored it."""
        k = _norm_keys(keys)
        v = _check_buffers(values, len(k), "value", writable=False)
        return self._put(k, v, self._deadline(timeout_ms))

    def _put(self, keys: list[bytes], values: list[Any], deadline: float) -> list[bool]:
        ok = [False] * len(keys)
        if not keys:
            return ok
        groups: dict[int, list[int]] = {}
        if len(self.endpoints) == 1:
            groups[0] = list(range(len(keys)))
        else:
            for i, key in enumerate(keys):
                for ep in self._placement.owners(key, self.replicas):
                    groups.setdefault(ep, []).append(i)

        def op(conn: NativeConnection, ms: int, idx: list[int]) -> list[int]:
            if len(idx) == len(keys):
                return conn.put(keys, values, timeout_ms=ms)
            return conn.put([keys[i] for i in idx], [values[i] for i in idx], timeout_ms=ms)

        for ep, res in self._fanout(groups, op, deadline).items():
            if isinstance(res, _Failed):
                continue
            for i, st in zip(groups[ep], res):
                if st == _OK:
                    ok[i] = True
        return ok

    def get(self, keys: Sequence[Any], timeout_ms: int | None = None) -> list[bytes | None]:
        """Values as ``bytes``; ``None`` for misses, unreachable servers and corrupt values."""
        k = _norm_keys(keys)
        return self._get(k, self._deadline(timeout_ms))

    def _get(self, keys: list[bytes], deadline: float) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)

        def op(conn: NativeConnection, ms: int, idx: list[int]) -> list[bytes | None]:
            return conn.get([keys[i] for i in idx], timeout_ms=ms)

        self._read_rounds(keys, deadline, op, lambda r: r is not None, out.__setitem__)
        return out

    def get_into(
        self, keys: Sequence[Any], buffers: Sequence[Any], timeout_ms: int | None = None
    ) -> list[bool]:
        """Read each value straight into its writable buffer (HostPool slot, numpy array,
        bytearray, ...). True where the value arrived intact; a False buffer's contents are
        undefined (it may hold partial or corrupt bytes). A value longer than its buffer is a
        miss and leaves the buffer untouched."""
        k = _norm_keys(keys)
        b = _check_buffers(buffers, len(k), "buffer", writable=True)
        return self._get_into(k, b, self._deadline(timeout_ms))

    def _get_into(self, keys: list[bytes], buffers: list[Any], deadline: float) -> list[bool]:
        ok = [False] * len(keys)

        def op(conn: NativeConnection, ms: int, idx: list[int]) -> list[int]:
            if len(idx) == len(keys):
                return conn.get_into(keys, buffers, timeout_ms=ms)
            return conn.get_into([keys[i] for i in idx], [buffers[i] for i in idx], timeout_ms=ms)

        def store(i: int, _st: int) -> None:
            ok[i] = True

        self._read_rounds(keys, deadline, op, lambda st: st == _OK, store)
        return ok

    def exists(self, keys: Sequence[Any], timeout_ms: int | None = None) -> list[bool]:
        """Whether each key is present (on any of its replicas)."""
        k = _norm_keys(keys)
        return self._exists(k, self._deadline(timeout_ms))

    def _exists(self, keys: list[bytes], deadline: float) -> list[bool]:
        out = [False] * len(keys)

        def op(conn: NativeConnection, ms: int, idx: list[int]) -> list[int]:
            return conn.exists([keys[i] for i in idx], timeout_ms=ms)

        def store(i: int, _st: int) -> None:
            out[i] = True

        self._read_rounds(keys, deadline, op, lambda st: st == _OK, store)
        return out

    def lookup_prefix(self, keys: Sequence[Any], timeout_ms: int | None = None) -> int:
        """Number of leading keys that are all present: how much of a prefix chain can be
        loaded. With several servers each owning server is asked about its own keys, all in
        parallel (one round trip each), and the leading run is computed here."""
        k = _norm_keys(keys)
        return self._lookup_prefix(k, self._deadline(timeout_ms))

    def _lookup_prefix(self, keys: list[bytes], deadline: float) -> int:
        if not keys:
            return 0
        if self.replicas > 1:
            present = self._exists(keys, deadline)
            return next((i for i, p in enumerate(present) if not p), len(keys))
        groups = self._group(keys, range(len(keys)), 0)

        def op(conn: NativeConnection, ms: int, idx: list[int]) -> int:
            return conn.lookup_prefix([keys[i] for i in idx], timeout_ms=ms)

        first_missing = len(keys)
        for ep, n in self._fanout(groups, op, deadline).items():
            idx = groups[ep]
            n = 0 if isinstance(n, _Failed) else int(n)
            if n < len(idx):  # this server's first missing key ends the chain there
                first_missing = min(first_missing, idx[n])
        return first_missing

    def delete(self, keys: Sequence[Any], timeout_ms: int | None = None) -> int:
        """Delete keys from all their replicas. Returns the number of keys deleted (counted
        on the replica rank that deleted the most, so replicas are not double counted)."""
        k = _norm_keys(keys)
        return self._delete(k, self._deadline(timeout_ms))

    def _delete(self, keys: list[bytes], deadline: float) -> int:
        if not keys:
            return 0

        def op(conn: NativeConnection, ms: int, idx: list[int]) -> int:
            return conn.delete([keys[i] for i in idx], timeout_ms=ms)

        best = 0
        for rank in range(self.replicas):
            res = self._fanout(self._group(keys, range(len(keys)), rank), op, deadline)
            best = max(best, sum(int(n) for n in res.values() if not isinstance(n, _Failed)))
        return best

    def stats(self, timeout_ms: int | None = None) -> dict[str, Any]:
        """Server statistics summed over reachable endpoints (used_bytes, capacity_bytes,
        items, hits, misses, evictions, ...), plus ``endpoints``: each endpoint's own dict (None
        when unreachable) and ``endpoints_up``."""
        deadline = self._deadline(timeout_ms)
        res = self._fanout(
            {i: [] for i in range(len(self.endpoints))},
            lambda c, ms, _idx: json.loads(c.stats_json(timeout_ms=ms)),
            deadline,
        )
        total: dict[str, Any] = dict.fromkeys(
            ("used_bytes", "capacity_bytes", "items", "hits", "misses", "evictions"), 0
        )
        per: dict[str, dict[str, Any] | None] = {}
        up = 0
        for ep in range(len(self.endpoints)):
            s = res.get(ep, FAILED)
            if isinstance(s, _Failed):
                per[str(self.endpoints[ep])] = None
                continue
            per[str(self.endpoints[ep])] = s
            up += 1
            for key, val in s.items():
                if isinstance(val, int) and not isinstance(val, bool):
                    total[key] = total.get(key, 0) + val
        total["endpoints"] = per
        total["endpoints_up"] = up
        return total

    def ping(self, timeout_ms: int | None = None) -> dict[str, float | None]:
        """Round-trip seconds per endpoint (None when unreachable). Ignores circuit-breaker
        backoff: a successful ping closes that endpoint's breaker."""
        deadline = self._deadline(timeout_ms)
        out: dict[str, float | None] = {}
        futures = {
            ep: self._io.submit(self._call, ep, lambda c, ms: c.ping(timeout_ms=ms), deadline, True)
            for ep in range(len(self.endpoints))
        }
        for ep, fut in futures.items():
            r = fut.result()
            out[str(self.endpoints[ep])] = None if isinstance(r, _Failed) else float(r)
        return out

    def owners(self, key: bytes | str) -> list[str]:
        """The endpoints that store ``key``, best first (``replicas`` of them)."""
        k = _norm_keys([key])[0]
        return [str(self.endpoints[i]) for i in self._placement.owners(k, self.replicas)]

    def is_down(self, endpoint: int | str) -> bool:
        """Whether an endpoint's circuit breaker is open (its keys are currently misses)."""
        i = endpoint if isinstance(endpoint, int) else [str(e) for e in self.endpoints].index(str(endpoint))
        return self._breakers[i].is_open

    @property
    def all_down(self) -> bool:
        """Whether every endpoint is marked down. Calls then answer misses without raising;
        :class:`~membrain.tiers.remote.RemoteTier` counts such a call as a failure, so its own
        (longer) breaker opens as it does for a backend that raises."""
        return all(b.is_open for b in self._breakers)

    # ------------------------------------------------------------------ async

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("client is closed")
        return self._async.submit(fn, *args)

    def put_async(
        self, keys: Sequence[Any], values: Sequence[Any], timeout_ms: int | None = None
    ) -> Future[list[bool]]:
        """``put`` in the background. Keep ``values`` unchanged until the future is done."""
        k = _norm_keys(keys)
        v = _check_buffers(values, len(k), "value", writable=False)
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        return self._submit(lambda: self._put(k, v, self._deadline(ms)))

    def get_async(self, keys: Sequence[Any], timeout_ms: int | None = None) -> Future[list[bytes | None]]:
        k = _norm_keys(keys)
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        return self._submit(lambda: self._get(k, self._deadline(ms)))

    def get_into_async(
        self, keys: Sequence[Any], buffers: Sequence[Any], timeout_ms: int | None = None
    ) -> Future[list[bool]]:
        """``get_into`` in the background. Do not read the buffers until the future is done."""
        k = _norm_keys(keys)
        b = _check_buffers(buffers, len(k), "buffer", writable=True)
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        return self._submit(lambda: self._get_into(k, b, self._deadline(ms)))

    def exists_async(self, keys: Sequence[Any], timeout_ms: int | None = None) -> Future[list[bool]]:
        k = _norm_keys(keys)
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        return self._submit(lambda: self._exists(k, self._deadline(ms)))

    def lookup_prefix_async(self, keys: Sequence[Any], timeout_ms: int | None = None) -> Future[int]:
        k = _norm_keys(keys)
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        return self._submit(lambda: self._lookup_prefix(k, self._deadline(ms)))

    def delete_async(self, keys: Sequence[Any], timeout_ms: int | None = None) -> Future[int]:
        k = _norm_keys(keys)
        ms = self.timeout_ms if timeout_ms is None else timeout_ms
        return self._submit(lambda: self._delete(k, self._deadline(ms)))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for async operations, then close every connection. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._async.shutdown(wait=True)
            self._closed = True
            self._io.shutdown(wait=True)
            for p in self._pools:
                p.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        eps = ",".join(str(e) for e in self.endpoints)
        return f"<membrain.Client {eps} namespace={self.namespace!r} replicas={self.replicas}>"
