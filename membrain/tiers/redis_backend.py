"""Redis / Valkey as the remote tier (redis-py, hiredis parser when installed).

Endpoints (LMCache's scheme names):

* ``redis://host:port``: one standalone server; ``rediss://host:port``: the same over TLS
  (certificates verified against the system CAs; ``SSL_CERT_FILE`` names a private CA).
* ``redis-cluster://h1:p1,h2:p2,...``: a Redis Cluster; the listed nodes are only the
  discovery seeds, the slot map comes from the cluster.

Wire format: each block is ``SET prefix+key value+trailer`` where ``prefix`` is
``mb:<namespace>:`` and the trailer is the XXH3-64 (:func:`membrain.checksum64`) of the value,
8 bytes little-endian. A read verifies the trailer and the length (the value must fill the
caller's buffer exactly); a corrupt, truncated or foreign value is a miss, never wrong bytes.
``get_into`` reads its replies in native code (:mod:`membrain.tiers.redis_direct`): each value's
body is received straight into the caller's buffer, without redis-py's copies or the GIL (over
TLS redis-py reads them, and each value is copied once more).

Batching: a batch of blocks is grouped by the cluster node that owns each key's slot and sent
as one pipelined round trip per node (``MGET`` cannot span slots), the nodes in parallel.
Failure model: like :class:`membrain.Client` -- the keys of a node that is down, slow or
answering errors (``CLUSTERDOWN``, ``MOVED`` while the slot map is stale) are misses; a failed
node is skipped by its own circuit breaker for a growing backoff, and the slot map is refreshed
in the background. When every node of a call failed the call raises ``ConnectionError``, so the
remote tier's breaker (:class:`~membrain.tiers.remote.RemoteTier`) opens as with Membrain.
Deadlines: ``timeout_ms`` is each socket operation's timeout and the whole call's deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

from membrain import checksum64
from membrain.client.breaker import CircuitBreaker
from membrain.tiers.redis_direct import TRAILER, get_batch_into
from membrain.utils.affinity import enter_background

log = logging.getLogger("membrain.redis")
MAX_KEY_LEN = 128


def _norm_keys(keys: Sequence[Any]) -> list[bytes]:
    out: list[bytes] = []
    for i, k in enumerate(keys):
        b = k.encode() if isinstance(k, str) else bytes(k)
        if not 1 <= len(b) <= MAX_KEY_LEN:
            raise ValueError(f"key {i} is {len(b)} bytes; keys must be 1..{MAX_KEY_LEN} bytes")
        out.append(b)
    return out


def _flat(buf: Any, writable: bool) -> memoryview:
    m = memoryview(buf)
    if not m.c_contiguous:
        raise ValueError("buffers must be C-contiguous")
    if writable and m.readonly:
        raise ValueError("get_into buffers must be writable")
    return m.cast("B") if m.ndim != 1 or m.format != "B" else m


def pack(value: Any) -> bytes:
    """``value`` followed by its XXH3-64 (8 bytes, little-endian)."""
    m = _flat(value, writable=False)
    return b"".join((m, checksum64(m).to_bytes(TRAILER, "little")))


def verify(stored: bytes, nbytes: int | None = None) -> memoryview | None:
    """The payload of ``stored`` when its trailer matches (and its length is ``nbytes`` when
    given), else None."""
    if len(stored) < TRAILER or (nbytes is not None and len(stored) != nbytes + TRAILER):
        return None
    m = memoryview(stored)[:-TRAILER]
    if checksum64(m) != int.from_bytes(stored[-TRAILER:], "little"):
        return None
    return m


def parse_redis_endpoints(endpoints: Sequence[str]) -> tuple[str, list[tuple[str, int]]]:
    """(scheme, [(host, port), ...]) of validated ``redis://`` / ``rediss://`` /
    ``redis-cluster://`` endpoints (see :func:`membrain.vllm.config.parse_endpoints`)."""
    schemes = {e.split("://", 1)[0] for e in endpoints}
    if len(schemes) != 1:
        raise ValueError(f"mixed Redis endpoint schemes: {sorted(schemes)}")
    scheme = schemes.pop()
    nodes = []
    for e in endpoints:
        p = urlsplit(e)
        if not p.hostname or p.port is None:
            raise ValueError(f"endpoint {e!r}: expected {scheme}://host:port")
        nodes.append((p.hostname, p.port))
    if scheme != "redis-cluster" and len(nodes) != 1:
        raise ValueError(f"{scheme}:// takes one server; use redis-cluster:// for several nodes")
    return scheme, nodes


def _connection_classes() -> tuple[type, type]:
    """redis-py connection classes that pack commands with redis-py's Python serializer even
    when hiredis is installed: hiredis' packer copies every argument into one buffer (about
    1.4 GB/s here, a third of a 1 MiB PUT pipeline's time); the Python one hands large values to
    the socket as they are. Replies are still parsed by hiredis."""
    import redis
    from redis.connection import PythonRespSerializer

    class Conn(redis.Connection):
        def _construct_command_packer(self, packer: Any) -> Any:
            return packer or PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)

    class SSLConn(redis.SSLConnection):
        def _construct_command_packer(self, packer: Any) -> Any:
            return packer or PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)

    return Conn, SSLConn


class RedisBackend:
    """Remote-tier backend on Redis / Valkey (standalone, TLS or cluster); satisfies
    :class:`membrain.tiers.backend.RemoteBackend`. Thread-safe."""

    def __init__(
        self,
        endpoints: Sequence[str],
        namespace: str = "default",
        timeout_ms: int = 2000,
        auth_token: str | None = None,
        *,
        io_threads: int = 8,
        put_threads: int = 2,
        breaker_base_s: float = 0.05,
        breaker_max_s: float = 5.0,
        refresh_interval_s: float = 1.0,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")
        self.scheme, self.nodes = parse_redis_endpoints(list(endpoints))
        self.prefix = f"mb:{namespace}:".encode()
        self.timeout_ms = int(timeout_ms)
        t = self.timeout_ms / 1000.0
        common: dict[str, Any] = {
            "password": auth_token,
            "socket_timeout": t,
            "socket_connect_timeout": t,
            "retry": Retry(NoBackoff(), 0),  # no hidden retries: the deadline is the caller's
            "health_check_interval": 0,
            # RESP2: no out-of-band pushes (RESP3's ">") can land between redis_direct's replies.
            "protocol": 2,
            "socket_read_size": 1 << 20,  # replies of 1 MiB values: 16x fewer recv + feed calls
        }
        self._cluster: Any = None
        self._single: Any = None
        self._cluster_lock = threading.Lock()
        conn_cls, ssl_conn_cls = _connection_classes()
        self._cluster_kwargs: dict[str, Any] = {
            # With a url, redis-py builds each node's pool from the kwargs, so the connection
            # class below reaches every node (also ones found later).
            "url": f"redis://{self.nodes[0][0]}:{self.nodes[0][1]}",
            "connection_class": conn_cls,
            "require_full_coverage": False,
            **common,
        }
        if self.scheme == "redis-cluster":
            # Connected on first use (and again after a failed attempt, when the breaker lets a
            # call through): a cluster that is down while vLLM starts only costs misses.
            pass
        else:
            h, p = self.nodes[0]
            pool = redis.ConnectionPool(
                connection_class=ssl_conn_cls if self.scheme == "rediss" else conn_cls,
                host=h,
                port=p,
                **common,
            )
            self._single = redis.Redis(connection_pool=pool)
        self._breaker_args = (breaker_base_s, breaker_max_s)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(
            max_workers=max(1, io_threads),
            thread_name_prefix="membrain-redis-io",
            initializer=enter_background,
        )
        self._puts = ThreadPoolExecutor(
            max_workers=max(1, put_threads),
            thread_name_prefix="membrain-redis-put",
            initializer=enter_background,
        )
        self._refresh_interval_s = refresh_interval_s
        self._refresh_due = False
        self._refreshing = False
        self._last_refresh = 0.0
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    def _breaker(self, name: str) -> CircuitBreaker:
        with self._lock:
            b = self._breakers.get(name)
            if b is None:
                b = self._breakers[name] = CircuitBreaker(*self._breaker_args)
            return b

    def _connect_cluster(self) -> Any:
        with self._cluster_lock:
            if self._cluster is None:
                from redis.cluster import ClusterNode, RedisCluster

                try:
                    self._cluster = RedisCluster(
                        startup_nodes=[ClusterNode(h, p) for h, p in self.nodes],  # type: ignore[no-untyped-call]
                        **self._cluster_kwargs,
                    )
                except Exception as e:
                    raise ConnectionError(f"Redis cluster unreachable: {e}") from None
            return self._cluster

    def _groups(self, keys: list[bytes]) -> list[tuple[str, Any, list[int]]]:
        """(node name, redis.Redis of that node, indices into keys), one per node."""
        if self._single is not None:
            return [("single", self._single, list(range(len(keys))))]
        cluster = self._connect_cluster()
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, k in enumerate(keys):
            try:
                node = cluster.get_node_from_key(k)
            except Exception:  # slot not covered (map being refreshed, node lost)
                self._refresh_due = True
                continue
            g = by_node.get(node.name)
            if g is None:
                g = by_node[node.name] = (node, [])
            g[1].append(i)
        out = []
        for name, (node, idx) in by_node.items():
            try:
                conn = cluster.get_redis_connection(node)
            except Exception:
                self._refresh_due = True
                continue
            out.append((name, conn, idx))
        return out

    def _maybe_refresh(self) -> None:
        """Reloads the cluster's slot map in the background (at most once per interval)."""
        if self._cluster is None or not self._refresh_due or self._closed:
            return
        now = time.monotonic()
        with self._lock:
            if self._refreshing or now - self._last_refresh < self._refresh_interval_s:
                return
            self._refreshing = True
            self._last_refresh = now
            self._refresh_due = False

        def run() -> None:
            try:
                self._cluster.nodes_manager.initialize()
            except Exception as e:
                log.debug("Redis cluster slot map refresh failed: %s", e)
                self._refresh_due = True
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="membrain-redis-refresh", daemon=True).start()

    def _run(
        self,
        keys: list[bytes],
        node_call: Callable[[Any, list[int], float], Any],
        timeout_ms: int | None = None,
        bounded: bool = False,
    ) -> list[tuple[list[int], Any]]:
        """``node_call(client, idx, deadline)`` for each node with its keys' indices, the nodes
        in parallel (the first on the calling thread), each behind its breaker. Returns
        ``(idx, result)`` for the nodes that answered; raises ConnectionError when none did
        (and there was at least one to ask). ``bounded``: a call still running at the deadline
        ends soon by itself (its reads by the deadline, a connect by the socket timeout), and is
        waited for, so nothing of it runs after the return; one that never started is dropped."""
        if self._closed:
            raise ConnectionError("Redis backend closed")
        deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000.0
        self._maybe_refresh()
        groups = self._groups([self.prefix + k for k in keys])

        def one(name: str, client: Any, idx: list[int]) -> tuple[list[int], Any] | None:
            if time.monotonic() >= deadline:
                return None  # queued behind other calls until too late: a miss, not the node's fault
            br = self._breaker(name)
            state = br.admit()
            if state == "open":
                return None
            try:
                result = node_call(client, idx, deadline)
            except Exception as e:
                br.failure(probe=state == "probe")
                self._refresh_due = self.scheme == "redis-cluster"
                log.debug("Redis node %s failed: %s", name, e)
                return None
            br.success()
            return idx, result

        if not groups:
            if keys:
                raise ConnectionError("no Redis node reachable for these keys")
            return []
        futs: list[Future[tuple[list[int], Any] | None]] = [self._io.submit(one, *g) for g in groups[1:]]
        results: list[tuple[list[int], Any] | None] = [one(*groups[0])]
        for f in futs:
            try:
                results.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                if bounded and not f.cancel():
                    # Running: it ends by the deadline by itself (its connect by the socket
                    # timeout); waiting for it means nothing of it runs after the return.
                    results.append(f.result())
                else:
                    results.append(None)
        done = [r for r in results if r is not None]
        if not done:
            raise ConnectionError(f"all {len(groups)} Redis node(s) failed or are backing off")
        return done

    def _pipelined(
        self, build: Callable[[Any, list[int]], None], handle: Callable[[list[int], list[Any]], Any]
    ) -> Callable[[Any, list[int], float], Any]:
        """A node call that sends one redis-py pipeline (``build(pipe, idx)`` queues its
        commands) and turns the replies into a result with ``handle(idx, replies)``."""

        def call(client: Any, idx: list[int], deadline: float) -> Any:
            pipe = client.pipeline(transaction=False)
            build(pipe, idx)
            replies = pipe.execute(raise_on_error=False)
            self._note_errors(client, [r for r in replies if isinstance(r, Exception)])
            return handle(idx, replies)

        return call

    def _note_errors(self, client: Any, errors: Sequence[Any]) -> None:
        """Error replies (CLUSTERDOWN / MOVED / ASK / TRYAGAIN / LOADING...) are misses; in a
        cluster they mean the slot map is stale, so it is reloaded."""
        if errors:
            self._refresh_due = self.scheme == "redis-cluster"
            log.debug("Redis node %s answered %d errors (first: %s)", client, len(errors), errors[0])

    # ------------------------------------------------------------------ API

    def lookup_prefix(self, keys: Sequence[Any]) -> int:
        k = _norm_keys(keys)
        if not k:
            return 0
        present = [False] * len(k)

        def build(pipe: Any, idx: list[int]) -> None:
            for i in idx:
                pipe.exists(self.prefix + k[i])

        for idx, replies in self._run(k, self._pipelined(build, lambda idx, r: r)):
            for i, r in zip(idx, replies):
                present[i] = r == 1
        n = 0
        while n < len(k) and present[n]:
            n += 1
        return n

    def get_into(
        self, keys: Sequence[Any], buffers: Sequence[Any], timeout_ms: int | None = None
    ) -> list[bool]:
        """Each value is received straight into its buffer (on the node's I/O thread) and
        reported True only when its checksum matched. A missing value, or one of another length,
        leaves its buffer untouched; one that fails its checksum leaves it undefined (as with
        :class:`membrain.Client`). No buffer is written after the call returns."""
        k = _norm_keys(keys)
        views = [_flat(b, writable=True) for b in buffers]
        if len(views) != len(k):
            raise ValueError(f"{len(k)} keys but {len(views)} buffers")
        out = [False] * len(k)
        if not k:
            return out

        if self.scheme == "rediss":
            return self._get_into_through_redis_py(k, views, out, timeout_ms)

        def node_call(client: Any, idx: list[int], deadline: float) -> list[int]:
            # Values are received straight into the views (redis_direct); the call ends by the
            # deadline, so _run waits for every node and no view is written after the return.
            pool = client.connection_pool
            conn = pool.get_connection()
            try:
                hits, errors = get_batch_into(
                    conn, [self.prefix + k[i] for i in idx], [views[i] for i in idx], deadline
                )
            except BaseException:
                conn.disconnect()  # replies may be left unread
                raise
            finally:
                pool.release(conn)
            self._note_errors(client, errors)
            return [i for i, hit in zip(idx, hits) if hit]

        for _idx, hits in self._run(k, node_call, timeout_ms, bounded=True):
            for i in hits:
                out[i] = True
        return out

    def _get_into_through_redis_py(
        self, k: list[bytes], views: list[memoryview], out: list[bool], timeout_ms: int | None
    ) -> list[bool]:
        """``get_into`` over TLS, whose socket native code cannot read beneath Python's ssl:
        redis-py parses the replies, each value is verified, then copied into its view."""
        lock = threading.Lock()
        open_ = [True]  # once the call returned, a node that answers late writes nothing

        def handle(idx: list[int], replies: list[Any]) -> list[int]:
            hits: list[int] = []
            for i, r in zip(idx, replies):
                p = verify(r, views[i].nbytes) if isinstance(r, bytes) else None
                if p is None:
                    continue
                with lock:
                    if not open_[0]:
                        break
                    views[i][:] = p
                hits.append(i)
            return hits

        def build(pipe: Any, idx: list[int]) -> None:
            for i in idx:
                pipe.get(self.prefix + k[i])

        try:
            for _idx, hits in self._run(k, self._pipelined(build, handle), timeout_ms):
                for i in hits:
                    out[i] = True
        finally:
            with lock:
                open_[0] = False
        return out

    def get(self, keys: Sequence[Any], timeout_ms: int | None = None) -> list[memoryview | None]:
        """The stored values (checksum verified, trailer stripped), None where missing or bad."""
        k = _norm_keys(keys)
        out: list[memoryview | None] = [None] * len(k)
        if not k:
            return out

        def build(pipe: Any, idx: list[int]) -> None:
            for i in idx:
                pipe.get(self.prefix + k[i])

        def handle(idx: list[int], replies: list[Any]) -> list[memoryview | None]:
            return [verify(r) if isinstance(r, bytes) else None for r in replies]

        for idx, payloads in self._run(k, self._pipelined(build, handle), timeout_ms):
            for i, p in zip(idx, payloads):
                out[i] = p
        return out

    def put(self, keys: Sequence[Any], values: Sequence[Any], timeout_ms: int | None = None) -> list[bool]:
        k = _norm_keys(keys)
        if len(values) != len(k):
            raise ValueError(f"{len(k)} keys but {len(values)} values")
        out = [False] * len(k)
        if not k:
            return out

        def build(pipe: Any, idx: list[int]) -> None:
            for i in idx:
                pipe.set(self.prefix + k[i], pack(values[i]))

        for idx, replies in self._run(k, self._pipelined(build, lambda idx, r: r), timeout_ms):
            for i, r in zip(idx, replies):
                out[i] = r is True
        return out

    def put_async(
        self, keys: Sequence[Any], values: Sequence[Any], timeout_ms: int | None = None
    ) -> Future[list[bool]]:
        """``put`` on the backend's small put pool; keep ``values`` unchanged until done."""
        k = _norm_keys(keys)
        v = list(values)
        for x in v:
            _flat(x, writable=False)
        return self._puts.submit(self.put, k, v, timeout_ms)

    def delete(self, keys: Sequence[Any]) -> int:
        k = _norm_keys(keys)
        n = 0

        def build(pipe: Any, idx: list[int]) -> None:
            for i in idx:
                pipe.delete(self.prefix + k[i])

        for _idx, replies in self._run(k, self._pipelined(build, lambda idx, r: r)):
            n += sum(r for r in replies if isinstance(r, int))
        return n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._puts.shutdown(wait=True)
        self._io.shutdown(wait=False)
        for c in (self._cluster, self._single):
            if c is not None:
                try:
                    c.close()
                except Exception:
                    pass
