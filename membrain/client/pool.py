"""Per-endpoint pool of native connections.

A connection carries one request at a time, so concurrent callers each take their own; idle
ones are kept (up to ``max_idle``) to skip TCP setup and HELLO. A connection that failed is
dropped, never returned, and a failure also flushes the idle ones: after a server restart they
are all dead, and finding that out one timeout at a time would be slow.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from membrain import _native
from membrain.client.endpoints import Endpoint

if TYPE_CHECKING:
    from typing import TypeAlias

    # Either native connection class: same methods, arguments and errors, no common base.
    NativeConnection: TypeAlias = _native.Connection | _native.UcxConnection


def connection_class(endpoint: Endpoint) -> type[NativeConnection]:
    """The native connection type for an endpoint's transport (same API for both)."""
    if endpoint.transport == "ucx":
        if not hasattr(_native, "UcxConnection"):  # registered only in UCX builds
            raise ValueError(
                f"{endpoint}: this membrain build has no UCX transport "
                "(native_info()['ucx'] is False); use a tcp:// endpoint"
            )
        return _native.UcxConnection
    return _native.Connection


class ConnectionPool:
    def __init__(
        self,
        endpoint: Endpoint,
        namespace: str,
        auth_token: str | None,
        connect_timeout_ms: int,
        max_idle: int = 8,
    ) -> None:
        self.endpoint = endpoint
        self._cls = connection_class(endpoint)  # a ucx:// endpoint without UCX fails here, at setup
        self.namespace = namespace
        self.auth_token = auth_token
        self.connect_timeout_ms = connect_timeout_ms
        self.max_idle = max_idle
        self._idle: list[NativeConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self, budget_ms: int) -> tuple[NativeConnection, bool]:
        """An idle connection (reused=True) or a new one connected within ``budget_ms``.
        Raises ConnectionError (TransportError) when the server cannot be reached."""
        with self._lock:
            if self._closed:
                raise _native.TransportError(f"{self.endpoint}: client is closed")
            if self._idle:
                return self._idle.pop(), True
        timeout = max(1, min(self.connect_timeout_ms, budget_ms))
        conn = self._cls(
            self.endpoint.host,
            self.endpoint.port,
            namespace=self.namespace,
            auth_token=self.auth_token,
            connect_timeout_ms=timeout,
            timeout_ms=timeout,
        )
        return conn, False

    def release(self, conn: NativeConnection) -> None:
        if conn.broken:
            return
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def flush(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.flush()
