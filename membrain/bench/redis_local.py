"""Throwaway local Redis servers for tests and benchmarks: one standalone ``redis-server`` or a
cluster of masters, each on a free loopback port in its own temp dir, no persistence. Stopped
by pid (``close``)."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def have_redis() -> bool:
    return bool(shutil.which("redis-server") and shutil.which("redis-cli"))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node one whose bus port (port + 10000) is free too."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(200):
        port = random.randint(20000, 29999)  # below the usual ephemeral range, bus port too
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis cluster node")


def _cli(port: int, *args: str, password: str | None = None, timeout: float = 10.0) -> str:
    cmd = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    if password:
        cmd += ["--no-auth-warning", "-a", password]
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout)
    return r.stdout + r.stderr


class RedisNode:
    """One ``redis-server`` on 127.0.0.1 (optionally a cluster node, optionally with a password)."""

    def __init__(
        self, cluster: bool = False, password: str | None = None, extra: list[str] | None = None
    ) -> None:
        self.port = free_port(cluster)
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="membrain-redis-")
        args = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--logfile", str(Path(self.dir) / "redis.log"),
        ]  # fmt: skip
        if cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(Path(self.dir) / "nodes.conf"),
                "--cluster-node-timeout", "1000",
            ]  # fmt: skip
        if password:
            args += ["--requirepass", password]
        args += extra or []
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "PONG" in self.cli("ping"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args, password=self.password)

    def kill(self) -> None:
        """SIGKILL (a crash); the temp dir stays until close()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create`` (no
    replicas); ready when every node reports ``cluster_state:ok``."""

    def __init__(self, masters: int = 3, password: str | None = None) -> None:
        self.nodes: list[RedisNode] = []
        try:
            for _ in range(masters):
                self.nodes.append(RedisNode(cluster=True, password=password))
            cmd = ["redis-cli", "--cluster", "create", *[n.endpoint for n in self.nodes]]
            cmd += ["--cluster-replicas", "0", "--cluster-yes"]
            if password:
                cmd += ["--no-auth-warning", "-a", password]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-500:]} {r.stderr[-500:]}")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                    return
                time.sleep(0.1)
            raise RuntimeError("Redis cluster did not reach cluster_state:ok")
        except BaseException:
            self.close()
            raise

    @property
    def endpoint(self) -> str:
        return "redis-cluster://" + ",".join(n.endpoint for n in self.nodes)

    def close(self) -> None:
        for n in self.nodes:
            n.close()
