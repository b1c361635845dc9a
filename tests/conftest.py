"""Shared fixtures.

``server_factory(**opts)`` starts a real ``membrain server`` subprocess and returns a handle with
``endpoint``, ``port``, ``metrics_url`` (with ``metrics_port=0``), ``kill()``, ``restart()`` (same
port), ``pause()``/``resume()`` (SIGSTOP/SIGCONT, a hung server). ``standalone`` is a throwaway
``redis-server`` (skipped where Redis is not installed). Tests import the installed ``membrain``
(make test installs it).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from membrain.utils.net import free_port

# Property tests must stay inside CI's time budget on 2 cores.
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HERE = Path(__file__).resolve().parent


class ServerProc:
    """One server subprocess on a fixed port (so it can be restarted in place)."""

    def __init__(self, port: int | None = None, **opts: Any) -> None:
        self.port = port or free_port()
        self.opts = opts
        self.proc: Any = None
        self._handle: Any = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` when started with ``metrics_port=0`` (or a port), else None."""
        return self._handle.metrics_url

    def start(self) -> None:
        from membrain.server import spawn_server

        deadline = time.monotonic() + 10
        while True:
            try:
                opts = {"capacity": "512MiB", **self.opts}
                # Test servers skip the background prefault: three of them populating 512 MiB
                # each would only compete with the test for two cores (test_server_storage
                # covers prefault itself).
                opts["extra_args"] = ["--no-prefault", *opts.get("extra_args", [])]
                self._handle = spawn_server(host="127.0.0.1", port=self.port, **opts)
                self.proc = self._handle.process
                return
            except Exception:
                # The port can linger briefly after a kill; retry until the deadline.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        # SIGSTOP is asynchronous: wait until the kernel reports the process stopped.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.005)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProc]]:
    procs: list[ServerProc] = []

    def make(**opts: Any) -> ServerProc:
        p = ServerProc(**opts)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


@pytest.fixture
def server(server_factory: Callable[..., ServerProc]) -> ServerProc:
    return server_factory()


@pytest.fixture
def inproc_server() -> Iterator[Any]:
    """An in-process server (C++ workers in native threads) on a free port."""
    from membrain.server import Server

    with Server(port=0, capacity="64MiB", threads=2, idle_timeout=30) as s:
        yield s


@pytest.fixture
def make_server() -> Iterator[Callable[..., Any]]:
    """Factory of in-process servers (``make_server(capacity=..., ...)``), stopped at teardown."""
    from membrain.server import Server

    made: list[Server] = []

    def make(**kw: Any) -> Server:
        kw.setdefault("port", 0)
        kw.setdefault("capacity", "64MiB")
        s = Server(**kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(0)


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(int(os.environ.get("MEMBRAIN_TEST_SEED", "1234")))


@pytest.fixture
def standalone() -> Iterator[Any]:
    """One throwaway redis-server on a loopback port (membrain.bench.redis_local.RedisNode)."""
    from membrain.bench.redis_local import RedisNode, have_redis

    if not have_redis():
        pytest.skip("redis-server / redis-cli not installed")
    node = RedisNode()
    yield node
    node.close()
