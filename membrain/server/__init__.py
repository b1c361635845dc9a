"""The Membrain server (the remote tier).

Two ways to run one:

* in-process: ``with Server(capacity="1GiB", port=0) as s: ... s.port ...`` - the C++ workers run
  in native threads, so the Python interpreter is free while it serves;
* as a subprocess: ``srv = spawn_server(capacity="1GiB")`` launches ``membrain server`` and waits
  for its READY line; ``srv.endpoint`` is ``tcp://host:port``; ``srv.stop()`` sends SIGTERM and
  waits for the drain.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from membrain.utils.launch import child_env, python_module_command
from membrain.utils.sizes import parse_size

READY_PREFIX = "MEMBRAIN SERVER READY"
_READY_RE = re.compile(
    r"^MEMBRAIN SERVER READY tcp://(?P<host>\[[^\]]+\]|[^:\s]+):(?P<port>\d+)(?: metrics=(?P<metrics>\S+))?"
    r"(?: ucx=ucx://(?:\[[^\]]+\]|[^:\s]+):(?P<ucx_port>\d+))?"
)


class Server:
    """An in-process Membrain server. Sizes accept ints or strings like ``"256MiB"``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        capacity: int | str = "256MiB",
        threads: int = 2,
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        ttl: float = 0.0,
        auth_token: str | bytes | None = None,
        *,
        slab_bytes: int | str = 0,
        socket_buffer_bytes: int | str = 4 << 20,
        max_batch: int = 1024,
        max_key_len: int = 128,
        max_value_bytes: int | str = 256 << 20,
        max_payload_bytes: int | str = 1 << 30,
        prefault: bool = True,
        ucx_port: int | None = None,
        max_pending_put_bytes: int | str = 0,
        max_pending_put_bytes_per_connection: int | str = 0,
        max_reply_bytes_per_connection: int | str = 1 << 30,
        auth_timeout: float = 10.0,
        tokens: dict[str, list[str]] | None = None,
        eviction_policy: str | None = None,
        namespace_priority: dict[str, int] | None = None,
    ) -> None:
        """`tokens` maps tokens to the namespace patterns each opens (glob: ``*``, ``?``); a
        token with ``"*"`` reaches everything. `auth_token` is one token for every namespace.
        `eviction_policy`: ``"slru"`` (default) or ``"lru"`` (docs/server.md#eviction).
        `namespace_priority` maps namespace patterns to a retention priority 0..3: objects of a
        higher priority are evicted only when none of a lower one is left."""
        from membrain import _native

        token = auth_token.decode() if isinstance(auth_token, bytes) else (auth_token or "")
        self._native = _native.Server(
            host=host,
            port=int(port),
            capacity=parse_size(capacity),
            threads=int(threads),
            max_connections=int(max_connections),
            idle_timeout=float(idle_timeout),
            ttl=float(ttl),
            auth_token=token,
            slab_bytes=parse_size(slab_bytes),
            socket_buffer_bytes=parse_size(socket_buffer_bytes),
            max_batch=int(max_batch),
            max_key_len=int(max_key_len),
            max_value_bytes=parse_size(max_value_bytes),
            max_payload_bytes=parse_size(max_payload_bytes),
            prefault=bool(prefault),
            ucx_port=-1 if ucx_port is None else int(ucx_port),
            max_pending_put_bytes=parse_size(max_pending_put_bytes),
            max_pending_put_bytes_per_connection=parse_size(max_pending_put_bytes_per_connection),
            max_reply_bytes_per_connection=parse_size(max_reply_bytes_per_connection),
            auth_timeout=float(auth_timeout),
            tokens=[(t, list(p)) for t, p in (tokens or {}).items()],
            eviction_policy=eviction_policy or str(_native.DEFAULT_EVICTION_POLICY),
            namespace_priority=[(p, int(n)) for p, n in (namespace_priority or {}).items()],
        )
        self.host = host

    def start(self) -> Server:
        self._native.start()
        return self

    def stop(self, drain_timeout: float = 5.0) -> None:
        self._native.stop(drain_timeout)

    @property
    def port(self) -> int:
        return int(self._native.port)

    @property
    def running(self) -> bool:
        return bool(self._native.running)

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def ucx_port(self) -> int | None:
        """The UCX listener's port, or None when the server was started without one."""
        p = int(self._native.ucx_port)
        return p or None

    @property
    def ucx_endpoint(self) -> str | None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ucx://{host}:{self.ucx_port}" if self.ucx_port else None

    @property
    def max_connections(self) -> int:
        """--max-connections as kept after start() fitted it to RLIMIT_NOFILE."""
        return int(self._native.max_connections)

    @property
    def fd_limit(self) -> tuple[int, int]:
        """(soft, hard) RLIMIT_NOFILE after start() raised the soft limit to the hard one."""
        return int(self._native.fd_limit), int(self._native.fd_limit_hard)

    def stats(self) -> dict[str, Any]:
        return dict(self._native.stats())

    def namespace_stats(self) -> dict[str, dict[str, Any]]:
        """Per-namespace figures (items, used_bytes, hits, ...) of the namespaces holding objects."""
        return {k: dict(v) for k, v in self._native.namespace_stats().items()}

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ServerProcess:
    """A ``membrain server`` subprocess started by :func:`spawn_server`."""

    process: subprocess.Popen
    host: str
    port: int
    metrics_url: str | None
    ready_line: str
    _stdout_thread: threading.Thread | None = field(default=None, repr=False)
    ucx_port: int | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def ucx_endpoint(self) -> str | None:
        return f"ucx://{self.host}:{self.ucx_port}" if self.ucx_port else None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the drain; SIGKILL if it takes longer than `timeout`. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_server(
    capacity: int | str = "256MiB",
    port: int = 0,
    host: str = "127.0.0.1",
    metrics_port: int = -1,
    extra_args: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    python: str | None = None,
    stderr: Any = None,
) -> ServerProcess:
    """Launches ``python -m membrain server`` and waits for its READY line.

    `extra_args` are passed through (e.g. ``["--ttl", "5", "--auth-token-file", path]``).
    The child inherits this process's stderr unless `stderr` says otherwise.
    Raises RuntimeError with the child's output if it exits or stays silent for `timeout` s.
    """
    from membrain.utils.sizes import format_size

    cap = format_size(capacity) if isinstance(capacity, int) else capacity
    cmd = python_module_command(
        "membrain",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--capacity",
        cap,
        "--metrics-port",
        str(metrics_port),
        *extra_args,
        python=python,
    )
    # The child imports the same membrain as this process, whatever its working directory.
    child = child_env(env)
    child.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=child, text=True, bufsize=1)
    lines: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # keeps draining after READY so the child never blocks on stdout
            if not ready.is_set():
                lines.append(line.rstrip("\n"))
                m = _READY_RE.match(line)
                if m:
                    found.update({k: v for k, v in m.groupdict().items() if v is not None})
                    found["line"] = line.strip()
                    ready.set()
        ready.set()

    t = threading.Thread(target=reader, name=f"membrain-server-{proc.pid}-stdout", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"membrain server did not print READY within {timeout}s: {cmd}\n" + "\n".join(lines)
            )
    if "port" not in found:
        proc.wait(5)
        raise RuntimeError(
            f"membrain server exited with {proc.returncode} before READY: {cmd}\n" + "\n".join(lines)
        )
    host_out = found["host"].strip("[]")
    ucx = int(found["ucx_port"]) if "ucx_port" in found else None
    return ServerProcess(
        proc, host_out, int(found["port"]), found.get("metrics"), found["line"], t, ucx_port=ucx
    )


__all__ = ["READY_PREFIX", "Server", "ServerProcess", "spawn_server"]
