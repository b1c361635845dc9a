"""``membrain stats``: a terminal view of a set of Membrain servers, like ``redis-cli --stat``.

Per server: state, stored bytes / capacity, items, hit ratio (over the last interval and since
start), data operations per second, bytes per second in and out, connections and evictions per
second. Rates come from two samples ``--interval`` seconds apart.

Two ways to reach a server:

* its data port, ``tcp://host:9201`` (the positional argument, comma-separated or repeated):
  the ``STATS`` request of the wire protocol. With ``--token`` / ``--token-file`` the connection
  authenticates with ``HELLO`` first, as any client must when the server runs with
  ``--auth-token-file``;
* its metrics port, ``--metrics-url http://host:9202`` (``/stats`` is appended when the URL has
  no path): the same JSON over HTTP. The server's metrics port is unauthenticated; a token given
  here is sent as ``Authorization: Bearer`` for a metrics port behind an authenticating proxy.

One-shot (default): sample, wait ``--interval``, sample again, print one table, exit 1 when a
server is down (0 otherwise). ``--watch [SECONDS]``: a new table every SECONDS until Ctrl-C (or
``--count`` tables). ``--json``: one JSON object per table instead, for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from membrain.utils.sizes import format_size

# Requests that move or query data; HELLO, STATS (our own polling) and PING are left out of ops/s.
DATA_OPS = ("PUT", "GET", "EXISTS", "LOOKUP_PREFIX", "DELETE")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:9201"


@dataclass
class Sample:
    """One poll of one server: its stats dict (None when down) and when it was taken."""

    t: float
    stats: dict[str, Any] | None
    error: str = ""


class _Source:
    """One server; ``poll()`` never raises, it returns a Sample with ``stats=None`` and an error."""

    name: str

    def poll(self) -> Sample:
        t = time.monotonic()
        try:
            stats = self._fetch()
        except Exception as e:  # any failure means "down", with the reason shown
            return Sample(t, None, _reason(e))
        if not isinstance(stats, dict):
            return Sample(t, None, "stats reply is not a JSON object")
        return Sample(t, stats)

    def _fetch(self) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:120]


class DataPortSource(_Source):
    """``STATS`` over the wire protocol; keeps one connection and reconnects after a failure."""

    def __init__(self, endpoint: Any, token: str | None, timeout_s: float) -> None:
        from membrain.client.pool import connection_class  # imports the native extension

        self.name = str(endpoint)
        self._endpoint = endpoint
        self._cls = connection_class(endpoint)
        self._token = token
        self._ms = max(1, int(timeout_s * 1000))
        self._conn: Any = None
        self._lock = threading.Lock()

    def _fetch(self) -> dict[str, Any]:
        with self._lock:
            if self._conn is None:
                self._conn = self._cls(
                    self._endpoint.host,
                    self._endpoint.port,
                    namespace="default",
                    auth_token=self._token,
                    connect_timeout_ms=self._ms,
                    timeout_ms=self._ms,
                )
            try:
                return dict(json.loads(self._conn.stats_json(timeout_ms=self._ms)))
            except BaseException:
                self._drop()
                raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()


class MetricsUrlSource(_Source):
    """``GET /stats`` on the metrics port."""

    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        self.url = metrics_stats_url(url)
        self.name = self.url[: -len("/stats")] if self.url.endswith("/stats") else self.url
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout_s

    def _fetch(self) -> dict[str, Any]:
        req = urllib.request.Request(self.url, headers=self._headers)
        with urllib.request.urlopen(req, timeout=self._timeout) as r:
            return dict(json.loads(r.read().decode("utf-8")))


def metrics_stats_url(url: str) -> str:
    """``http://h:9202`` -> ``http://h:9202/stats``; a URL with a path is kept as it is."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"bad metrics URL {url!r}: expected http://host:port")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/stats")
    return urllib.parse.urlunsplit(parts)


# ---------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """What one server's line shows; rates are None without a previous sample."""

    server: str
    up: bool
    error: str = ""
    used_bytes: int = 0
    capacity_bytes: int = 0
    items: int = 0
    connections: int = 0
    hit_ratio: float | None = None  # over the interval (None: no lookups in it, or one sample)
    hit_ratio_total: float | None = None  # since the server started
    ops_per_s: float | None = None
    in_bytes_per_s: float | None = None
    out_bytes_per_s: float | None = None
    evictions_per_s: float | None = None
    uptime_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        if not self.up:
            d = {"server": self.server, "up": False, "error": self.error}
        return d


def _num(s: dict[str, Any], key: str) -> float:
    v = s.get(key, 0)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _data_ops(s: dict[str, Any]) -> float:
    req = s.get("requests")
    if not isinstance(req, dict):
        return 0.0
    return float(sum(v for k, v in req.items() if k in DATA_OPS and isinstance(v, (int, float))))


def _ratio(hits: float, misses: float) -> float | None:
    return hits / (hits + misses) if hits + misses > 0 else None


def make_row(name: str, cur: Sample, prev: Sample | None) -> Row:
    """A server's row from its latest sample and, for rates, the one before it."""
    s = cur.stats
    if s is None:
        return Row(name, False, cur.error or "unreachable")
    row = Row(
        name,
        True,
        used_bytes=int(_num(s, "used_bytes")),
        capacity_bytes=int(_num(s, "capacity_bytes")),
        items=int(_num(s, "items")),
        connections=int(_num(s, "connections")),
        hit_ratio_total=_ratio(_num(s, "hits"), _num(s, "misses")),
        uptime_s=_num(s, "uptime_s"),
    )
    p = prev.stats if prev is not None else None
    dt = cur.t - prev.t if prev is not None else 0.0
    # A restarted server (counters went backwards) gets rates from the next interval on.
    if p is not None and dt > 0 and _num(s, "uptime_s") >= _num(p, "uptime_s"):

        def rate(v: float, pv: float) -> float:
            return max(0.0, v - pv) / dt

        row.ops_per_s = rate(_data_ops(s), _data_ops(p))
        row.in_bytes_per_s = rate(_num(s, "bytes_in"), _num(p, "bytes_in"))
        row.out_bytes_per_s = rate(_num(s, "bytes_out"), _num(p, "bytes_out"))
        row.evictions_per_s = rate(_num(s, "evictions"), _num(p, "evictions"))
        row.hit_ratio = _ratio(
            max(0.0, _num(s, "hits") - _num(p, "hits")), max(0.0, _num(s, "misses") - _num(p, "misses"))
        )
    return row


def total_row(rows: list[Row]) -> Row:
    up = [r for r in rows if r.up]
    t = Row(f"TOTAL ({len(up)}/{len(rows)} up)", bool(up))
    for r in up:
        t.used_bytes += r.used_bytes
        t.capacity_bytes += r.capacity_bytes
        t.items += r.items
        t.connections += r.connections
    for attr in ("ops_per_s", "in_bytes_per_s", "out_bytes_per_s", "evictions_per_s"):
        vals = [getattr(r, attr) for r in up if getattr(r, attr) is not None]
        setattr(t, attr, sum(vals) if vals else None)
    return t


# ---------------------------------------------------------------------------------------- text

_COLUMNS = [
    ("SERVER", "<"),
    ("STATE", "<"),
    ("USED", ">"),
    ("CAPACITY", ">"),
    ("USE%", ">"),
    ("ITEMS", ">"),
    ("HIT%", ">"),
    ("HIT%ALL", ">"),
    ("OPS/S", ">"),
    ("IN/S", ">"),
    ("OUT/S", ">"),
    ("CONNS", ">"),
    ("EVICT/S", ">"),
]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def _bytes_rate(v: float | None) -> str:
    return "-" if v is None else format_size(round(v))


def _cells(r: Row) -> list[str]:
    if not r.up:
        return [r.server, "down", f"({r.error})"]
    use = r.used_bytes / r.capacity_bytes if r.capacity_bytes else None
    return [
        r.server,
        "up",
        format_size(r.used_bytes),
        format_size(r.capacity_bytes),
        _pct(use),
        str(r.items),
        _pct(r.hit_ratio),
        _pct(r.hit_ratio_total),
        _rate(r.ops_per_s),
        _bytes_rate(r.in_bytes_per_s),
        _bytes_rate(r.out_bytes_per_s),
        str(r.connections),
        _rate(r.evictions_per_s),
    ]


def render(rows: list[Row], stamp: str | None = None) -> str:
    """The table: a header, one line per server and, for several servers, a total line."""
    lines = [[h for h, _ in _COLUMNS]] + [_cells(r) for r in rows]
    if len(rows) > 1:
        tot = total_row(rows)
        cells = _cells(tot) if tot.up else [tot.server, "down", ""]
        if tot.up:
            cells[6] = cells[7] = "-"  # a ratio of sums over mixed intervals would mislead
            cells[1] = ""
        lines.append(cells)
    full = [c for c in lines if len(c) == len(_COLUMNS)]
    widths = [max(len(c[i]) for c in (lines if i < 2 else full)) for i in range(len(_COLUMNS))]
    out = []
    if stamp:
        out.append(stamp)
    for cells in lines:
        if len(cells) < len(_COLUMNS):  # a down server: its reason spans the rest of the line
            head = [f"{cells[i]:{_COLUMNS[i][1]}{widths[i]}}" for i in range(2)]
            out.append("  ".join([*head, cells[2]]).rstrip())
            continue
        out.append("  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, _COLUMNS, widths)).rstrip())
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="membrain stats",
        description="Show Membrain servers' usage, hit ratio and traffic (one-shot, or --watch).",
        epilog="Examples: membrain stats tcp://10.0.0.5:9201,tcp://10.0.0.6:9201 --watch 2 | "
        "membrain stats --metrics-url http://10.0.0.5:9202 --json",
    )
    p.add_argument(
        "endpoints",
        nargs="*",
        help="data endpoints tcp://host:port (comma-separated or repeated); default "
        f"$VLLM_MEMBRAIN_ENDPOINT or {DEFAULT_ENDPOINT} when no --metrics-url is given",
    )
    p.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        metavar="URL",
        help="a server's metrics port, http://host:9202 (comma-separated or repeated); read via /stats",
    )
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until Ctrl-C",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="one-shot: seconds between the two samples that rates come from; 0 = one sample, no rates",
    )
    p.add_argument("--count", type=int, default=0, help="--watch: stop after this many tables (0 = never)")
    p.add_argument(
        "--token", default=None, help="auth token (prefer --token-file: a command line is visible)"
    )
    p.add_argument(
        "--token-file", default=None, help="file holding the auth token (the server's --auth-token-file)"
    )
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each server")
    p.add_argument("--json", action="store_true", help="print one JSON object per table")
    return p


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                tok = f.read().strip()
        except OSError as e:
            raise SystemExit(
                f"membrain stats: cannot read --token-file {args.token_file!r}: {e.strerror}"
            ) from None
        if not tok:
            raise SystemExit(f"membrain stats: --token-file {args.token_file!r} is empty")
        return tok
    return args.token or None


def make_sources(args: argparse.Namespace) -> list[_Source]:
    from membrain.client.endpoints import parse_endpoints

    token = _token(args)
    eps = [e for spec in args.endpoints for e in spec.split(",") if e.strip()]
    urls = [u for spec in args.metrics_url for u in spec.split(",") if u.strip()]
    if not eps and not urls:
        eps = [e for e in os.environ.get("VLLM_MEMBRAIN_ENDPOINT", DEFAULT_ENDPOINT).split(",") if e.strip()]
    try:
        parsed = parse_endpoints(eps) if eps else []
        sources: list[_Source] = [MetricsUrlSource(u, token, args.timeout) for u in urls]
    except ValueError as e:
        raise SystemExit(f"membrain stats: {e}") from None
    return [DataPortSource(e, token, args.timeout) for e in parsed] + sources


def _poll_all(pool: ThreadPoolExecutor, sources: list[_Source]) -> list[Sample]:
    # In parallel: a server that does not answer costs one --timeout, not one per server.
    return list(pool.map(lambda s: s.poll(), sources))


def _emit(rows: list[Row], as_json: bool) -> None:
    if as_json:
        doc: dict[str, Any] = {"time": time.time(), "servers": [r.to_json() for r in rows]}
        if len(rows) > 1:
            doc["total"] = total_row(rows).to_json()
        print(json.dumps(doc), flush=True)
    else:
        print(render(rows, time.strftime("%Y-%m-%d %H:%M:%S")), flush=True)


class _CtrlC:
    """Ctrl-C as a flag the loop checks, not an exception.

    A ``KeyboardInterrupt`` can land anywhere in the main thread, including inside the thread
    pool's locks and waits while a poll is in flight (Python does not guarantee a ``with``
    block's exit runs when the signal lands between acquire and the block). The handler only
    sets a flag and writes a byte to a pipe the sleeps wait on: it takes no lock, since it runs
    on the main thread wherever that thread was, possibly holding the very lock (a
    ``threading.Event.set`` here once deadlocked against the ``Event.wait`` it interrupted). The
    current poll (at most ``--timeout``) finishes first. A SIGINT that the parent set to be
    ignored (a background job of a script, ``nohup``) stays ignored, as for any Unix tool.
    """

    def __init__(self) -> None:
        self.fired = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._previous: Any = None
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, _sig: int, _frame: Any) -> None:
        self.fired = True
        try:
            os.write(self._w, b"x")
        except OSError:  # the pipe is full: a byte is already waiting
            pass

    def sleep(self, seconds: float) -> bool:
        """Sleeps ``seconds``; True when Ctrl-C came (now or earlier)."""
        if not self.fired:
            select.select([self._r], [], [], max(0.0, seconds))
        return self.fired

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        os.close(self._r)
        os.close(self._w)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        raise SystemExit("membrain stats: --watch SECONDS must be > 0")
    if args.interval < 0 or args.timeout <= 0 or args.count < 0:
        raise SystemExit("membrain stats: --interval must be >= 0, --timeout > 0, --count >= 0")
    # The data-port client logs reconnect warnings; a down server is shown in the table instead.
    logging.getLogger("membrain").setLevel(logging.CRITICAL)
    sources = make_sources(args)
    pool = ThreadPoolExecutor(max_workers=min(32, len(sources)), thread_name_prefix="membrain-stats")
    ctrl_c = _CtrlC()
    try:
        prev = _poll_all(pool, sources)
        if args.watch is None:
            if args.interval > 0:
                if ctrl_c.sleep(args.interval):
                    return 0
                cur = _poll_all(pool, sources)
            else:
                cur, prev = prev, [Sample(0.0, None)] * len(sources)
            rows = [make_row(s.name, c, p) for s, c, p in zip(sources, cur, prev)]
            _emit(rows, args.json)
            return 0 if all(r.up for r in rows) else 1
        shown = 0
        next_t = time.monotonic()
        while True:
            next_t += args.watch
            if ctrl_c.sleep(next_t - time.monotonic()):
                return 0
            cur = _poll_all(pool, sources)
            if ctrl_c.fired:
                return 0
            _emit([make_row(s.name, c, p) for s, c, p in zip(sources, cur, prev)], args.json)
            prev = cur
            shown += 1
            if args.count and shown >= args.count:
                return 0
    except (
        KeyboardInterrupt
    ):  # only before the handler is installed, or when main() is not on the main thread
        return 0
    except BrokenPipeError:  # `membrain stats --watch | head`
        # Python flushes stdout again at exit: point it at /dev/null so that is quiet too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    finally:
        ctrl_c.restore()
        pool.shutdown(wait=False)
        for s in sources:
            s.close()
