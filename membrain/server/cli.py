"""``membrain server``: run the remote tier.

Prints exactly one line to stdout once it is serving (tests and scripts wait for it)::

    MEMBRAIN SERVER READY tcp://127.0.0.1:9201 metrics=http://127.0.0.1:9202

Logs go to stderr. SIGTERM or SIGINT drains (stop accepting, finish in-flight requests and
replies, close) and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading

from membrain.utils.sizes import format_size, parse_size

log = logging.getLogger("membrain.server")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(allow_off: bool):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
        lo = -1 if allow_off else 0
        if not lo <= v <= 65535:
            raise argparse.ArgumentTypeError(f"port {v} out of range {lo}..65535")
        return v

    return parse


# Timeouts and TTLs become int64 nanoseconds in C++: a bound keeps that conversion defined.
MAX_SECONDS = 365 * 24 * 3600.0


def _namespace_priority_arg(text: str) -> tuple[str, int]:
    pattern, sep, n = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PATTERN=N")
    try:
        v = int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: priority {n!r} is not an integer") from None
    if not 0 <= v <= 3:
        raise argparse.ArgumentTypeError(f"{text!r}: priority must be in 0..3")
    return pattern, v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v:g} must be >= 0")
    if v > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{v:g} s is over the maximum of {MAX_SECONDS:g} s (one year)")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="membrain server",
        description="Run a Membrain server: the remote KV-cache tier (see docs/server.md, docs/protocol.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 or :: for all interfaces)"
    )
    p.add_argument(
        "--port",
        type=_port(False),
        default=9201,
        help="TCP port; 0 picks a free port (printed in the READY line)",
    )
    p.add_argument(
        "--capacity",
        type=_size,
        default="256MiB",
        help="hard bound on stored value bytes, e.g. 256MiB, 64GiB; eviction keeps within it",
    )
    p.add_argument(
        "--eviction-policy",
        choices=["slru", "lru"],
        default="slru",
        help="what is evicted first: slru (default) = values written once and never read before values "
        "read again (a ghost list remembers evicted keys); lru = least recently used",
    )
    p.add_argument(
        "--namespace-priority",
        action="append",
        type=_namespace_priority_arg,
        default=[],
        metavar="PATTERN=N",
        help="retention priority 0..3 of the namespaces matching PATTERN (glob); a higher priority is "
        "evicted only when nothing of a lower one is left (repeatable; first match wins)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port(True),
        default=9202,
        help="HTTP port for /healthz, /metrics (Prometheus) and /stats (JSON); 0 = free port, -1 = off",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics HTTP server listens on (loopback by default, whatever --host is); "
        "with --auth-token-file, /metrics and /stats require 'Authorization: Bearer <token>'",
    )
    p.add_argument(
        "--ucx-port",
        type=_port(True),
        default=-1,
        help="also listen for UCX clients (ucx://host:port) on this port; 0 picks a free port "
        "(printed in the READY line), -1 (default) = off. Transports follow UCX_TLS/UCX_NET_DEVICES",
    )
    p.add_argument(
        "--threads", type=_positive_int, default=min(4, os.cpu_count() or 1), help="event-loop worker threads"
    )
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=1024,
        help="connections beyond this are accepted and closed at once",
    )
    p.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=60.0,
        help="seconds; closes a connection idle this long, or whose frame or reply takes longer; 0 = never",
    )
    p.add_argument(
        "--ttl",
        type=_seconds,
        default=0.0,
        help="seconds an object lives after it is written; 0 = forever",
    )
    p.add_argument(
        "--max-pending-put-bytes",
        type=_size,
        default=0,
        help="PUT value bytes reserved but not yet received, all connections together (the server "
        "evicts only for bytes that arrived; this bounds what clients that declare values and stall "
        "can hold); 0 = max(max value size, capacity/4)",
    )
    p.add_argument(
        "--max-pending-put-bytes-per-connection",
        type=_size,
        default=0,
        help="the same bound for one connection; 0 = the max value size (min(256MiB, capacity))",
    )
    p.add_argument(
        "--max-reply-bytes-per-connection",
        type=_size,
        default="1GiB",
        help="reply bytes (GET values stay pinned until sent) one connection may leave unread; "
        "past it the connection is closed (like Redis' client-output-buffer-limit)",
    )
    p.add_argument(
        "--auth-timeout",
        type=_seconds,
        default=10.0,
        help="with --auth-token-file: seconds a new connection has to authenticate (HELLO) before "
        "it is closed; 0 = no deadline",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address (--host, --metrics-host) without "
        "--auth-token-file; refused otherwise (protected mode)",
    )
    p.add_argument(
        "--auth-token-file",
        default=None,
        help="file holding a shared secret; clients must HELLO with it before anything else",
    )
    p.add_argument(
        "--no-prefault",
        action="store_true",
        help="do not back the whole --capacity with memory at start (it is then faulted in as values "
        "arrive, which slows first PUTs); by default a background thread populates it",
    )
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level"
    )
    return p


def _is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback one ("" = all interfaces: no)."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # the server reports the resolution error itself
    try:
        return bool(infos) and all(
            ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos
        )
    except ValueError:
        return False


def _fail(message: str) -> SystemExit:
    """A start-up error: the message on stderr and exit status 2 (like argparse's own errors)."""
    print(f"membrain server: error: {message}", file=sys.stderr)
    return SystemExit(2)


def _read_token(path: str) -> dict[str, list[str]]:
    """The token file: either one token (the whole file, whitespace-stripped), good for every
    namespace, or - when it starts with ``{`` - a JSON object mapping tokens to the namespace
    patterns they open (glob: ``*``, ``?``)::

        {"tokens": {"tenant-a-secret": ["tenant-a", "tenant-a-*"], "admin-secret": ["*"]}}
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise _fail(f"cannot read --auth-token-file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise _fail(f"--auth-token-file {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not token:
        raise _fail(f"--auth-token-file {path!r} is empty")
    if not token.startswith("{"):
        return {token: ["*"]}
    try:
        doc = json.loads(token)
    except ValueError as e:
        raise _fail(f"--auth-token-file {path!r} starts with '{{' but is not valid JSON: {e}") from None
    table = doc.get("tokens") if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not table:
        raise _fail(
            f'--auth-token-file {path!r}: expected {{"tokens": {{"<token>": ["<namespace pattern>", ...]}}}}'
        )
    out: dict[str, list[str]] = {}
    for tok, pats in table.items():
        if isinstance(pats, str):
            pats = [pats]
        if (
            not tok
            or not isinstance(pats, list)
            or not pats
            or not all(isinstance(p, str) and p for p in pats)
        ):
            raise _fail(
                f"--auth-token-file {path!r}: each token must be non-empty and open a non-empty list "
                "of namespace patterns"
            )
        out[tok] = pats
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = _read_token(args.auth_token_file) if args.auth_token_file else None
    if token is None and not args.insecure:
        # Protected mode (as Redis): no token, so anyone who can reach the port owns the data.
        metrics_on = args.metrics_port >= 0
        for opt, host in (
            ("--host", args.host),
            ("--metrics-host", args.metrics_host if metrics_on else None),
        ):
            if host is not None and not _is_loopback(host):
                log.error(
                    "refusing to listen on %s (%s) without authentication: anyone who can reach it could "
                    "read and overwrite every value. Give --auth-token-file, listen on a loopback address, "
                    "or pass --insecure to run unprotected anyway",
                    host,
                    opt,
                )
                return 2

    from membrain.server import Server  # imports the native extension

    try:
        server = Server(
            host=args.host,
            port=args.port,
            capacity=args.capacity,
            threads=args.threads,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            ttl=args.ttl,
            tokens=token,
            prefault=not args.no_prefault,
            ucx_port=None if args.ucx_port < 0 else args.ucx_port,
            max_pending_put_bytes=args.max_pending_put_bytes,
            max_pending_put_bytes_per_connection=args.max_pending_put_bytes_per_connection,
            max_reply_bytes_per_connection=args.max_reply_bytes_per_connection,
            auth_timeout=args.auth_timeout,
            eviction_policy=args.eviction_policy,
            namespace_priority=dict(args.namespace_priority),
        )
        server.start()
    except (ValueError, RuntimeError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2

    metrics = None
    if args.metrics_port >= 0:
        try:
            from membrain.server.metrics import MetricsServer

            metrics = MetricsServer(
                server.stats,
                host=args.metrics_host,
                port=args.metrics_port,
                tokens=token,
                namespace_stats=server.namespace_stats,
            ).start()
        except OSError as e:
            log.error(
                "cannot serve metrics on %s:%d: %s (use --metrics-port 0 for a free port, -1 to disable)",
                args.metrics_host,
                args.metrics_port,
                e,
            )
            server.stop(0)
            return 2

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    soft, hard = server.fd_limit
    if server.max_connections < args.max_connections:
        log.warning(
            "--max-connections %d lowered to %d to fit the open-files limit (RLIMIT_NOFILE soft %d, hard %d)",
            args.max_connections,
            server.max_connections,
            soft,
            hard,
        )
    else:
        log.info("open-files limit: RLIMIT_NOFILE soft %d (raised to the hard limit %d)", soft, hard)
    st = server.stats()
    log.info(
        "serving %s: capacity %s (slabs of %s), %d threads, max %d connections, idle timeout %gs, ttl %s, auth %s",
        server.endpoint,
        format_size(st["capacity_bytes"]),
        format_size(st["slab_bytes"]),
        args.threads,
        server.max_connections,
        args.idle_timeout,
        f"{args.ttl:g}s" if args.ttl else "off",
        "on" if token else "off",
    )
    ready = f"MEMBRAIN SERVER READY {server.endpoint}"
    if metrics:
        ready += f" metrics={metrics.url}"
    if server.ucx_endpoint:
        ready += f" ucx={server.ucx_endpoint}"
    print(ready, flush=True)

    while not stop.wait(1.0):
        pass
    log.info("%s received: draining connections", signal.Signals(received[0]).name if received else "stop")
    server.stop(drain_timeout=10.0)
    if metrics:
        metrics.stop()
    st = server.stats()
    log.info(
        "stopped: %d items, %s stored, %d requests served",
        st["items"],
        format_size(st["used_bytes"]),
        sum(st["requests"].values()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
