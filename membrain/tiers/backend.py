"""What the remote tier needs from a backend.

:class:`membrain.Client` (Membrain servers, the default) and
:class:`membrain.tiers.redis_backend.RedisBackend` (Redis / Valkey, standalone or cluster) both
satisfy :class:`RemoteBackend`; :class:`~membrain.tiers.remote.RemoteTier` wraps either one.

Contract: transport failures are misses (``False`` / ``0``) or, where a whole call could not be
made, an exception that the tier turns into misses and a circuit-breaker failure. A value is
only reported present in ``get_into`` when it arrived intact (checksum verified) and fills the
caller's buffer exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RemoteBackend(Protocol):
    def lookup_prefix(self, keys: Sequence[Any]) -> int:
        """How many leading ``keys`` are present."""
        ...

    def get_into(
        self, keys: Sequence[Any], buffers: Sequence[Any], timeout_ms: int | None = None
    ) -> list[bool]:
        """Reads each value into its writable C-contiguous buffer; True where it arrived intact.
        ``timeout_ms`` overrides the backend's deadline for this call (it scales with bytes)."""
        ...

    def put_async(
        self, keys: Sequence[Any], values: Sequence[Any], timeout_ms: int | None = None
    ) -> Future[list[bool]]:
        """Stores in the background; ``values`` must stay unchanged until the future is done."""
        ...

    def close(self) -> None: ...


REDIS_SCHEMES = ("redis", "rediss", "redis-cluster")
MEMBRAIN_SCHEMES = ("tcp", "http", "ucx")


def endpoint_scheme(endpoint: str) -> str:
    return endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""


def is_redis(endpoints: Sequence[str]) -> bool:
    """Whether (already validated) ``endpoints`` name a Redis / Valkey backend."""
    return bool(endpoints) and endpoint_scheme(endpoints[0]) in REDIS_SCHEMES
