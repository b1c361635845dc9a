"""Membrain settings for vLLM: environment variables and ``kv_connector_extra_config``.

Environment (front end; copied into ``kv_connector_extra_config`` by the plugin):

=================================  =============================================================
``VLLM_MEMBRAIN_ENABLED``          ``1`` turns Membrain on for plain ``vllm serve`` / ``LLM(...)``
``VLLM_MEMBRAIN_ENDPOINT``         ``http://localhost:9201``; ``tcp://`` (same as ``http://``) and
                                   ``ucx://`` servers, comma-separated; or a Redis / Valkey
                                   backend: ``redis://h:p``, ``rediss://h:p`` (TLS),
                                   ``redis-cluster://h1:p1,h2:p2,...``
``VLLM_MEMBRAIN_NAMESPACE``        ``default``
``VLLM_MEMBRAIN_CPU_CACHE_SIZE``   host tier per worker, e.g. ``2GiB``; ``0`` disables it.
                                   Default: min(10% of MemAvailable, 4 GiB), resolved once in the
                                   front end so scheduler and workers agree.
``VLLM_MEMBRAIN_HOST_PREFAULT``    ``1`` (default) / ``0``: back the host tier and its staging
                                   slots with memory when the worker starts, so loads never take
                                   their first-touch page faults; ``0`` commits them as they fill
``VLLM_MEMBRAIN_REMOTE``           ``1`` (default) / ``0``: use the remote servers
``VLLM_MEMBRAIN_TIMEOUT_MS``       per remote operation, default 2000
``VLLM_MEMBRAIN_LOOKUP_BUDGET_MS`` how long a new request waits for its remote lookup before it
                                   is admitted without the remote tier's blocks, default 500
``VLLM_MEMBRAIN_MAX_INFLIGHT``     remote stores in flight per worker before new ones are
                                   dropped (never waited on), default 256 blocks
``VLLM_MEMBRAIN_AUTH_TOKEN_FILE``  file holding the servers' auth token (read by every process;
                                   the token itself never enters vLLM's config or logs)
``VLLM_MEMBRAIN_REPLICAS``         servers each block is written to (reads fall back), default 1
``VLLM_MEMBRAIN_LOAD_FAILURE_POLICY``  ``recompute`` (default: a failed load is a miss) or
                                   ``fail`` (vLLM fails the request)
``VLLM_MEMBRAIN_COMPRESSION``      ``zstd[:level]``: byte-shuffle + zstd of remote values (off
                                   by default; needs the ``zstandard`` package)
``VLLM_MEMBRAIN_EVICTION_POLICY``  host tier eviction: ``slru`` (default) or ``lru``
``VLLM_MEMBRAIN_ADMISSION``        host tier admission: ``all`` (default) or ``seen`` (a block
                                   is kept on its second sight only)
``VLLM_MEMBRAIN_PRIORITY``         retention priority 0..3 of this instance's prefixes (default
                                   0); a request overrides it with ``kv_transfer_params=
                                   {"membrain_priority": N}``
=================================  =============================================================

Extra-config keys (explicit ``--kv-transfer-config``) use the lower-case names without the prefix:
``endpoint``, ``namespace``, ``cpu_cache_size``, ``host_prefault``, ``remote``, ``timeout_ms``,
``lookup_budget_ms``, ``max_inflight``, ``auth_token_file``, ``replicas``, ``load_failure_policy``, ``compression``,
``eviction_policy``, ``admission``, ``priority``; they win over the environment, and both paths go
through :func:`resolve`. An unknown key or an unusable value raises
:class:`ConfigError` at start-up; an unreachable server does not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from membrain.tiers.backend import REDIS_SCHEMES, is_redis
from membrain.tiers.codec import parse_compression
from membrain.utils import sizes

ENV_PREFIX = "VLLM_MEMBRAIN_"
DEFAULT_ENDPOINT = "http://localhost:9201"
DEFAULT_NAMESPACE = "default"
DEFAULT_TIMEOUT_MS = 2000
# A lookup answers in about a millisecond from a healthy server; one still out after this long
# means a hung or overloaded one, and its request is admitted without the remote tier's blocks
# (computed) rather than waiting up to the call's deadline for the answer.
DEFAULT_LOOKUP_BUDGET_MS = 500
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_CPU_CACHE_CAP = 4 << 30
DEFAULT_CPU_CACHE_FRACTION = 0.10

KNOWN_KEYS = (
    "enabled",
    "endpoint",
    "namespace",
    "cpu_cache_size",
    "host_prefault",
    "remote",
    "timeout_ms",
    "lookup_budget_ms",
    "max_inflight",
    "auth_token_file",
    "replicas",
    "load_failure_policy",
    "compression",
    "eviction_policy",
    "admission",
    "priority",
)
LOAD_FAILURE_POLICIES = ("recompute", "fail")
EVICTION_POLICIES = ("slru", "lru")
ADMISSIONS = ("all", "seen")
MAX_PRIORITY = 3


class ConfigError(ValueError):
    """An unusable Membrain configuration (reported at start-up)."""


def parse_size(text: str | int) -> int:
    """:func:`membrain.utils.sizes.parse_size` (binary units), raising ConfigError."""
    try:
        return sizes.parse_size(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_bool(text: str | bool | int, name: str) -> bool:
    if isinstance(text, bool):
        return text
    v = str(text).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}: expected 0/1/true/false, got {text!r}")


def parse_endpoints(text: str | list[str]) -> list[str]:
    """Validates ``tcp://``, ``http://`` and ``ucx://host:port`` (Membrain servers) or
    ``redis://host:port``, ``rediss://host:port`` and ``redis-cluster://h1:p1,h2:p2,...`` (a
    Redis / Valkey backend), comma-separated or a list. Inside ``redis-cluster://`` the nodes
    after the first may omit the scheme; they come back as one ``redis-cluster://h:p`` each.
    Mixing Redis and Membrain endpoints, or several ``redis://`` servers, is a ConfigError."""
    items = text if isinstance(text, list) else str(text).split(",")
    out: list[str] = []
    for raw in items:
        ep = str(raw).strip()
        if not ep:
            continue
        if "://" not in ep and out and out[-1].startswith("redis-cluster://"):
            ep = "redis-cluster://" + ep
        parts = urlsplit(ep)
        if parts.scheme not in ("tcp", "http", "ucx", *REDIS_SCHEMES):
            raise ConfigError(
                f"endpoint {ep!r}: scheme must be tcp://, http://, ucx://, redis://, rediss:// "
                "or redis-cluster://"
            )
        try:
            port = parts.port
        except ValueError as e:
            raise ConfigError(f"endpoint {ep!r}: bad port ({e})") from None
        if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"endpoint {ep!r}: expected scheme://host:port")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"endpoint {parts.scheme}://...@{parts.hostname}:{port}: no credentials in endpoints; "
                "the auth_token_file is the Redis password"
            )
        out.append(f"{parts.scheme}://{parts.netloc}")
    if not out:
        raise ConfigError("no Membrain endpoint given")
    schemes = {e.split("://", 1)[0] for e in out}
    if schemes & set(REDIS_SCHEMES):
        if len(schemes) > 1:
            raise ConfigError(
                f"endpoints mix {', '.join(sorted(schemes))}: a Redis / Valkey backend "
                "(redis://, rediss://, redis-cluster://) cannot be combined with Membrain servers "
                "or another Redis scheme"
            )
        if not schemes & {"redis-cluster"} and len(out) > 1:
            raise ConfigError(
                f"{len(out)} redis:// endpoints: give one server, or redis-cluster://h1:p1,h2:p2 for a cluster"
            )
    return out


def default_cpu_cache_bytes() -> int:
    """min(10% of MemAvailable, 4 GiB)."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail <= 0:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 8 << 30
    return int(min(avail * DEFAULT_CPU_CACHE_FRACTION, DEFAULT_CPU_CACHE_CAP))


@dataclass(frozen=True)
class MembrainSettings:
    endpoints: list[str] = field(default_factory=lambda: [DEFAULT_ENDPOINT])
    namespace: str = DEFAULT_NAMESPACE
    cpu_cache_bytes: int = 0
    remote: bool = True
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    auth_token_file: str = ""
    replicas: int = 1
    load_failure_policy: str = "recompute"
    compression: str = ""
    eviction_policy: str = "slru"
    admission: str = "all"
    priority: int = 0
    host_prefault: bool = True
    lookup_budget_ms: int = DEFAULT_LOOKUP_BUDGET_MS

    def to_extra_config(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "endpoint": ",".join(d["endpoints"]),
            "namespace": d["namespace"],
            "cpu_cache_size": d["cpu_cache_bytes"],
            "remote": d["remote"],
            "timeout_ms": d["timeout_ms"],
            "max_inflight": d["max_inflight"],
            "auth_token_file": d["auth_token_file"],
            "replicas": d["replicas"],
            "load_failure_policy": d["load_failure_policy"],
            "compression": d["compression"],
            "eviction_policy": d["eviction_policy"],
            "admission": d["admission"],
            "priority": d["priority"],
            "host_prefault": d["host_prefault"],
            "lookup_budget_ms": d["lookup_budget_ms"],
        }

    def auth_token(self) -> str | None:
        """The token from ``auth_token_file`` (None without one). Raises ConfigError when the
        file cannot be read or is empty."""
        return read_token_file(self.auth_token_file) if self.auth_token_file else None


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"auth_token_file {path!r}: cannot read a UTF-8 token ({e})") from None
    if not token:
        raise ConfigError(f"auth_token_file {path!r} is empty")
    return token


def parse_priority(value: Any, name: str) -> int:
    """A retention priority 0..3 (docs/vllm.md#priorities), raising ConfigError."""
    try:
        p = int(str(value).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {value!r}: expected an integer 0..{MAX_PRIORITY}") from None
    if not 0 <= p <= MAX_PRIORITY:
        raise ConfigError(f"{name} {p}: expected 0..{MAX_PRIORITY}")
    return p


def env_enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return parse_bool(env.get(ENV_PREFIX + "ENABLED", "0"), ENV_PREFIX + "ENABLED")


def _env_values(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in env.items():
        if not k.startswith(ENV_PREFIX):
            continue
        name = k[len(ENV_PREFIX) :].lower()
        if name not in KNOWN_KEYS:
            raise ConfigError(
                f"unknown setting {k} (known: {', '.join(ENV_PREFIX + n.upper() for n in KNOWN_KEYS)})"
            )
        out[name] = v
    return out


def resolve(extra: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> MembrainSettings:
    """Settings from ``extra`` (kv_connector_extra_config) over ``VLLM_MEMBRAIN_*`` env vars.

    Raises ConfigError for an unusable value or an unknown ``VLLM_MEMBRAIN_*`` variable.
    """
    env = os.environ if env is None else env
    vals = _env_values(env)
    for k, v in (extra or {}).items():
        if k not in KNOWN_KEYS:
            raise ConfigError(f"unknown kv_connector_extra_config key {k!r} (known: {', '.join(KNOWN_KEYS)})")
        vals[k] = v
    endpoints = parse_endpoints(vals.get("endpoint", DEFAULT_ENDPOINT))
    namespace = str(vals.get("namespace", DEFAULT_NAMESPACE))
    if not namespace or len(namespace) > 64 or not re.fullmatch(r"[A-Za-z0-9_.\-]+", namespace):
        raise ConfigError(f"namespace {namespace!r}: 1-64 characters of [A-Za-z0-9_.-]")
    size = vals.get("cpu_cache_size")
    cpu_bytes = (
        default_cpu_cache_bytes()
        if size is None or str(size).strip().lower() in ("", "auto")
        else parse_size(size)
    )
    remote = parse_bool(vals.get("remote", True), "remote")
    host_prefault = parse_bool(vals.get("host_prefault", True), "host_prefault")
    try:
        timeout_ms = int(vals.get("timeout_ms", DEFAULT_TIMEOUT_MS))
        lookup_budget_ms = int(vals.get("lookup_budget_ms", DEFAULT_LOOKUP_BUDGET_MS))
        max_inflight = int(vals.get("max_inflight", DEFAULT_MAX_INFLIGHT))
        replicas = int(vals.get("replicas", 1))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"timeout_ms / lookup_budget_ms / max_inflight / replicas must be integers ({e})"
        ) from None
    if timeout_ms <= 0 or lookup_budget_ms <= 0 or max_inflight < 0:
        raise ConfigError("timeout_ms and lookup_budget_ms must be > 0 and max_inflight >= 0")
    if is_redis(endpoints) and replicas != 1:
        raise ConfigError("replicas must be 1 with a Redis / Valkey backend (it replicates on its own)")
    if not 1 <= replicas <= len(endpoints):
        raise ConfigError(f"replicas must be 1..{len(endpoints)} (the number of endpoints), got {replicas}")
    policy = str(vals.get("load_failure_policy", "recompute")).strip().lower()
    if policy not in LOAD_FAILURE_POLICIES:
        raise ConfigError(
            f"load_failure_policy {policy!r}: expected one of {', '.join(LOAD_FAILURE_POLICIES)}"
        )
    token_file = str(vals.get("auth_token_file", "") or "")
    compression = str(vals.get("compression", "") or "").strip().lower()
    try:
        spec = parse_compression(compression)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if spec is not None:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"compression {compression!r} needs the zstandard package (pip install membrain[compression])"
            ) from None
    eviction = str(vals.get("eviction_policy", "slru")).strip().lower()
    if eviction not in EVICTION_POLICIES:
        raise ConfigError(f"eviction_policy {eviction!r}: expected one of {', '.join(EVICTION_POLICIES)}")
    admission = str(vals.get("admission", "all")).strip().lower()
    if admission not in ADMISSIONS:
        raise ConfigError(f"admission {admission!r}: expected one of {', '.join(ADMISSIONS)}")
    priority = parse_priority(vals.get("priority", 0), "priority")
    settings = MembrainSettings(
        endpoints,
        namespace,
        cpu_bytes,
        remote,
        timeout_ms,
        max_inflight,
        token_file,
        replicas,
        policy,
        compression if spec else "",
        eviction,
        admission,
        priority,
        host_prefault,
        lookup_budget_ms,
    )
    settings.auth_token()  # an unreadable token file is a start-up error, in the front end too
    return settings
