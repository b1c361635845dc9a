"""Endpoint strings: ``tcp://host:port`` (``http://host:port`` is accepted as a synonym, for
configurations written for other caches) or ``ucx://host:port`` (the server's ``--ucx-port``,
UCX transport; needs a build with UCX). IPv6 hosts go in brackets: ``tcp://[::1]:7400``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SCHEMES = ("tcp", "http", "ucx")
_RE = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]:/\s]+):(?P<port>[0-9]+)/?$"
)


@dataclass(frozen=True, order=True)
class Endpoint:
    """One Membrain server address."""

    host: str
    port: int
    transport: str = "tcp"  # "tcp" or "ucx"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``tcp://host:port`` or ``http://host:port``; raise ValueError on anything else."""
    if not isinstance(text, str):
        raise ValueError(f"endpoint must be a string like 'tcp://host:port', got {text!r}")
    m = _RE.match(text.strip())
    if not m:
        raise ValueError(f"bad endpoint {text!r}: expected 'tcp://host:port' (or 'http://host:port')")
    scheme = m["scheme"].lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"bad endpoint {text!r}: unsupported scheme {scheme!r} (use tcp://, http:// or ucx://)"
        )
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"bad endpoint {text!r}: port must be 1..65535")
    host = m["host"].strip("[]")
    return Endpoint(host, port, "ucx" if scheme == "ucx" else "tcp")


def parse_endpoints(spec: str | Iterable[str]) -> list[Endpoint]:
    """Parse one endpoint, a comma-separated list, or an iterable of endpoint strings.
    Raises ValueError on bad syntax, duplicates, or an empty list."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("at least one endpoint is required")
    out = [parse_endpoint(s) for s in items]
    seen: set[Endpoint] = set()
    for ep in out:
        if ep in seen:
            raise ValueError(f"duplicate endpoint {ep}")
        seen.add(ep)
    return out
