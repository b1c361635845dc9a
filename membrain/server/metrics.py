"""HTTP side channel for operators: ``/healthz``, ``/metrics`` (Prometheus text) and ``/stats``
(JSON). Runs in a Python thread and only ever reads the C++ counters - it is never on the data
path, so a slow scraper cannot slow a GET.

Bounded: at most ``max_connections`` connections are served at once (more are closed at once),
each with a socket timeout, so idle or slow HTTP clients cannot pile up threads and file
descriptors. With a token, ``/metrics`` and ``/stats`` require ``Authorization: Bearer <token>``
(Prometheus' ``authorization`` / ``bearer_token`` scrape settings); ``/healthz`` stays open.
A token limited to some namespaces sees only those in ``/stats`` (``{"namespaces": {...}}``) and
gets 403 from ``/metrics`` (server-wide figures).
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

StatsFn = Callable[[], dict[str, Any]]

# (stats key, metric name, help) - counters
_COUNTERS = [
    ("hits", "membrain_hits", "GET keys found"),
    ("misses", "membrain_misses", "GET keys not found (or expired)"),
    ("evictions", "membrain_evictions", "objects evicted to make room"),
    (
        "slab_reassignments",
        "membrain_slab_reassignments",
        "slabs emptied by eviction and given to another size class",
    ),
    ("expired", "membrain_expired", "objects dropped because their TTL passed"),
    ("puts", "membrain_puts", "values stored (published after checksum verification)"),
    ("deletes", "membrain_deletes", "objects removed by DELETE"),
    ("bytes_in", "membrain_received_bytes", "bytes received from clients"),
    ("bytes_out", "membrain_sent_bytes", "bytes sent to clients"),
    ("connections_total", "membrain_connections_accepted", "connections accepted"),
    (
        "connections_rejected",
        "membrain_connections_rejected",
        "connections closed at once for --max-connections",
    ),
    ("accept_pauses", "membrain_accept_pauses", "times accepting paused because file descriptors ran out"),
    ("protocol_errors", "membrain_protocol_errors", "frames rejected as malformed or over a limit"),
    ("auth_failures", "membrain_auth_failures", "requests refused for missing or wrong token"),
    ("timeouts", "membrain_timeouts", "connections closed for idleness, a slow frame or a slow reader"),
    (
        "checksum_failures",
        "membrain_checksum_failures",
        "PUT values dropped because the checksum did not match",
    ),
    ("no_space", "membrain_no_space", "PUT values refused because they could not fit"),
    (
        "put_bytes_buffered",
        "membrain_put_buffered_bytes",
        "PUT value bytes copied from the input buffer instead of received straight into storage",
    ),
]
# gauges
_GAUGES = [
    ("used_bytes", "membrain_stored_bytes", "bytes of values currently stored"),
    ("capacity_bytes", "membrain_capacity_bytes", "hard bound on stored bytes (--capacity)"),
    (
        "allocated_bytes",
        "membrain_allocated_bytes",
        "slab bytes in use (includes pinned and in-flight values)",
    ),
    ("items", "membrain_items", "objects currently stored"),
    ("connections", "membrain_connections", "open client connections"),
    ("fragmentation", "membrain_fragmentation_ratio", "(allocated - stored) / allocated"),
    ("uptime_s", "membrain_uptime_seconds", "seconds since the server started"),
]


class _Collector:
    def __init__(self, stats: StatsFn) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()
        for key, name, help_ in _COUNTERS:
            c = CounterMetricFamily(name, help_)
            c.add_metric([], float(s.get(key, 0)))
            yield c
        for key, name, help_ in _GAUGES:
            g = GaugeMetricFamily(name, help_)
            g.add_metric([], float(s.get(key, 0)))
            yield g
        ev = CounterMetricFamily(
            "membrain_evictions_by_reason",
            "objects evicted, by what they were: probation (written once, never read again), "
            "protected (re-used), priority (a raised --namespace-priority)",
            labels=["reason"],
        )
        for reason, n in sorted(s.get("evictions_by_reason", {}).items()):
            ev.add_metric([reason], float(n))
        yield ev
        info = GaugeMetricFamily(
            "membrain_eviction_policy", "the eviction policy in use (always 1)", labels=["policy"]
        )
        if s.get("eviction_policy"):
            info.add_metric([str(s["eviction_policy"])], 1.0)
        yield info
        req = CounterMetricFamily("membrain_requests", "requests received, by opcode", labels=["op"])
        for op, n in sorted(s.get("requests", {}).items()):
            req.add_metric([op], float(n))
        yield req


class _BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, but at most `max_connections` of them: the rest are closed
    as soon as they are accepted."""

    daemon_threads = True
    request_queue_size = (
        128  # listen backlog: excess clients are accepted and closed, not left in SYN retries
    )

    def __init__(self, addr: tuple[str, int], handler: type, max_connections: int) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.rejected = 0

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.rejected += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """Serves the three endpoints on (host, port); port 0 picks a free one.

    `token`: when set, /metrics and /stats answer 401 without ``Authorization: Bearer <token>``.
    `max_connections` connections are served at once; `timeout` seconds bound each socket
    operation (an idle or stalled client is dropped after it).
    """

    def __init__(
        self,
        stats: StatsFn,
        host: str = "127.0.0.1",
        port: int = 9202,
        token: str | None = None,
        max_connections: int = 16,
        timeout: float = 5.0,
        tokens: dict[str, list[str]] | None = None,
        namespace_stats: Callable[[], dict[str, dict[str, Any]]] | None = None,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(stats))
        grants = dict(tokens or {})
        if token:
            grants[token] = ["*"]
        expected = [(f"Bearer {t}".encode(), pats) for t, pats in grants.items()]

        class Handler(BaseHTTPRequestHandler):
            def grant(self) -> list[str] | None:
                """Namespace patterns the request's token opens (["*"] when auth is off)."""
                if not expected:
                    return ["*"]
                got = (self.headers.get("Authorization") or "").strip().encode()
                found = None
                for want, pats in expected:  # every token compared: timing does not tell which
                    if hmac.compare_digest(got, want) and found is None:
                        found = pats
                return found

            def reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="membrain"')
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                pats = self.grant() if path in ("/metrics", "/stats") else ["*"]
                if pats is None:
                    return self.reply(401, b"unauthorized: send Authorization: Bearer <token>\n")
                if "*" not in pats:
                    if path == "/metrics":
                        return self.reply(403, b"forbidden: this token sees its namespaces only, in /stats\n")
                    per_ns = namespace_stats() if namespace_stats else {}
                    mine = {
                        ns: v for ns, v in per_ns.items() if any(fnmatch.fnmatchcase(ns, p) for p in pats)
                    }
                    return self.reply(
                        200,
                        json.dumps({"namespaces": mine}, sort_keys=True).encode() + b"\n",
                        "application/json",
                    )
                if path == "/healthz":
                    body, ctype, code = b"ok\n", "text/plain; charset=utf-8", 200
                elif path == "/metrics":
                    body, ctype, code = (
                        generate_latest(registry),
                        "text/plain; version=0.0.4; charset=utf-8",
                        200,
                    )
                elif path == "/stats":
                    body, ctype, code = (
                        json.dumps(stats(), sort_keys=True).encode() + b"\n",
                        "application/json",
                        200,
                    )
                else:
                    body, ctype, code = b"not found: try /healthz, /metrics or /stats\n", "text/plain", 404
                self.reply(code, body, ctype)

            def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line each
                pass

        Handler.timeout = timeout  # socket timeout for every read and write of a connection
        self._httpd = _BoundedHTTPServer((host, port), Handler, max_connections)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="membrain-metrics", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
