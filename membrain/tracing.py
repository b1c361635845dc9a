"""Optional OpenTelemetry spans for Membrain's per-request work: lookup, load and store.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
turn it off) and the ``otel`` extra is installed (``pip install 'membrain[otel]'``). Spans are
exported over OTLP/HTTP (protobuf) in batches by the OpenTelemetry SDK, from a tracer provider of
Membrain's own (the global one, e.g. vLLM's, is left alone). The standard ``OTEL_*`` variables
apply: ``OTEL_SERVICE_NAME`` (default ``membrain``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``...

Off, it costs nothing: ``opentelemetry`` is never imported, :data:`ENABLED` is False, and every
helper returns one shared no-op object at once. Callers on hot paths may still test
``tracing.ENABLED`` first to skip building the arguments.

Use::

    from membrain import tracing

    with tracing.lookup_span(request_id, blocks=n, trace_headers=request.trace_headers) as sp:
        m = tiers.match(...)
        sp.set(local_blocks=m.local, host_blocks=m.host_blocks, remote_blocks=m.remote_blocks)

    with tracing.load_span(request_id, blocks=len(block_ids)) as sp:
        ...
        sp.set(host_blocks=h, remote_blocks=r, failed_blocks=f, bytes=nbytes)

    sp = tracing.remote_store_span(request_id, blocks=len(keys))  # ended by a callback
    ...
    sp.end(remote_blocks=ok, dropped_blocks=len(keys) - ok, bytes=ok * block_bytes)

Attributes (all prefixed ``membrain.``): ``request_id``, ``blocks`` (asked for), ``blocks.local``,
``blocks.host``, ``blocks.remote``, ``blocks.failed``, ``blocks.dropped``, ``bytes``, ``tier``
(``host``, ``remote``, ``host+remote`` or ``none``: the tiers that served or took blocks) and
``outcome``. Unless set explicitly, ``tier`` and ``outcome`` are derived when the span ends:
lookup ``hit`` / ``miss``; load and store ``ok`` / ``partial`` / ``failed``; any span whose
``with`` block raised: ``error`` (with the exception recorded and the span status ERROR).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("membrain.tracing")

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PREFIX = "membrain."
# set() keywords -> attribute names
_KEYS = {
    "request_id": "membrain.request_id",
    "blocks": "membrain.blocks",
    "local_blocks": "membrain.blocks.local",
    "host_blocks": "membrain.blocks.host",
    "remote_blocks": "membrain.blocks.remote",
    "failed_blocks": "membrain.blocks.failed",
    "dropped_blocks": "membrain.blocks.dropped",
    "bytes": "membrain.bytes",
    "tier": "membrain.tier",
    "outcome": "membrain.outcome",
}


def _wanted(env: Mapping[str, str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(v, "").strip() for v in _ENDPOINT_VARS)


#: Whether spans are recorded. Decided from the environment at import; turns False at the first
#: span if the OpenTelemetry packages cannot be loaded (one warning is logged).
ENABLED: bool = _wanted()

_tracer: Any = None
_provider: Any = None  # the provider Membrain created (and so shuts down), if any
_lock = threading.Lock()


class _NoopSpan:
    """What every helper returns while tracing is off: accepts everything, does nothing."""

    __slots__ = ()
    recording = False

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, **attrs: Any) -> None:
        return None

    def end(self, **attrs: Any) -> None:
        return None


NOOP = _NoopSpan()


def _derive(kind: str, a: dict[str, Any]) -> None:
    host, remote = int(a.get("host_blocks") or 0), int(a.get("remote_blocks") or 0)
    if "tier" not in a and ("host_blocks" in a or "remote_blocks" in a):
        a["tier"] = "host+remote" if host and remote else "host" if host else "remote" if remote else "none"
    if "outcome" in a:
        return
    if kind == "lookup":
        if "host_blocks" in a or "remote_blocks" in a:
            a["outcome"] = "hit" if host + remote > 0 else "miss"
        return
    bad = int(a.get("failed_blocks") or 0) + int(a.get("dropped_blocks") or 0)
    if not bad:
        if "host_blocks" in a or "remote_blocks" in a or "blocks" in a:
            a["outcome"] = "ok"
    else:
        a["outcome"] = "partial" if host + remote > 0 else "failed"


class Span:
    """A recording span: a context manager, or ended explicitly with :meth:`end`."""

    __slots__ = ("_attrs", "_done", "_kind", "_lock", "_span")
    recording = True

    def __init__(self, span: Any, kind: str, attrs: dict[str, Any]) -> None:
        self._span = span
        self._kind = kind
        self._attrs = attrs
        self._done = False
        self._lock = threading.Lock()

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and not self._done:
            from opentelemetry.trace import Status, StatusCode

            self._span.record_exception(exc)
            self._span.set_status(Status(StatusCode.ERROR, f"{exc_type.__name__}: {exc}"))
            self._attrs.setdefault("outcome", "error")
        self.end()

    def set(self, **attrs: Any) -> None:
        """Adds attributes (see the module doc for the keywords; others become ``membrain.<key>``)."""
        with self._lock:
            self._attrs.update((k, v) for k, v in attrs.items() if v is not None)

    def end(self, **attrs: Any) -> None:
        """Adds attributes, derives ``tier`` and ``outcome`` and ends the span (once; later calls
        do nothing). Safe from any thread."""
        with self._lock:
            if self._done:
                return
            self._done = True
            self._attrs.update((k, v) for k, v in attrs.items() if v is not None)
            a = self._attrs
        _derive(self._kind, a)
        self._span.set_attributes({_KEYS.get(k, _PREFIX + k): _value(v) for k, v in a.items()})
        self._span.end()

    @property
    def otel_span(self) -> Any:
        """The underlying ``opentelemetry.trace.Span``."""
        return self._span


def _value(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def _setup() -> Any:
    global _provider
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "membrain"}
    provider = TracerProvider(resource=Resource.create(attrs))  # flushes at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    return provider.get_tracer("membrain", _version())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("membrain")
    except Exception:
        return "0"


def _get_tracer() -> Any:
    global _tracer, ENABLED
    t = _tracer
    if t is not None or not ENABLED:
        return t
    with _lock:
        if _tracer is None and ENABLED:
            try:
                _tracer = _setup()
            except Exception as e:  # ImportError without the extra; anything else the SDK raises
                ENABLED = False
                log.warning(
                    "Membrain tracing off: an OTLP endpoint is set but the OpenTelemetry SDK and "
                    "OTLP/HTTP exporter could not be loaded (%s); install membrain[otel]",
                    e,
                )
        return _tracer


def _parent_context(parent: Any, trace_headers: Mapping[str, str] | None) -> Any:
    if isinstance(parent, Span):
        from opentelemetry import trace

        return trace.set_span_in_context(parent.otel_span)
    if trace_headers:
        from opentelemetry.propagate import extract

        return extract(dict(trace_headers))
    return None


def start_span(
    kind: str,
    request_id: str | None = None,
    *,
    parent: Span | _NoopSpan | None = None,
    trace_headers: Mapping[str, str] | None = None,
    **attrs: Any,
) -> Span | _NoopSpan:
    """A started span named ``membrain.<kind>``; ``kind`` ``lookup``, ``load`` or ``store``
    (or their ``.``-suffixed variants, e.g. ``store.remote``) chooses how ``outcome`` is derived.
    ``parent``: a span from this module; ``trace_headers``: W3C ``traceparent`` headers of the
    request (vLLM's ``request.trace_headers``), so the span joins the request's trace."""
    if not ENABLED:
        return NOOP
    tracer = _get_tracer()
    if tracer is None:
        return NOOP
    a = {k: v for k, v in attrs.items() if v is not None}
    if request_id is not None:
        a["request_id"] = str(request_id)
    ctx = _parent_context(parent, trace_headers)
    span = tracer.start_span(_PREFIX + kind, context=ctx)
    return Span(span, kind.split(".", 1)[0], a)


def lookup_span(
    request_id: str, blocks: int, *, trace_headers: Mapping[str, str] | None = None
) -> Span | _NoopSpan:
    """Scheduler side: finding how many of a request's ``blocks`` prompt blocks the tiers hold.
    Set ``local_blocks``, ``host_blocks``, ``remote_blocks``; outcome ``hit`` / ``miss``."""
    if not ENABLED:
        return NOOP
    return start_span("lookup", request_id, trace_headers=trace_headers, blocks=blocks)


def load_span(request_id: str, blocks: int) -> Span | _NoopSpan:
    """Worker side: loading ``blocks`` blocks of a request into the KV cache. Set
    ``host_blocks``, ``remote_blocks`` (loaded), ``failed_blocks``, ``bytes``; outcome ``ok`` /
    ``partial`` / ``failed``."""
    if not ENABLED:
        return NOOP
    return start_span("load", request_id, blocks=blocks)


def store_span(request_id: str, blocks: int) -> Span | _NoopSpan:
    """Worker side: storing ``blocks`` newly computed blocks of a request. Set ``host_blocks``
    (stored), ``remote_blocks`` (shipped; they complete in a :func:`remote_store_span`),
    ``dropped_blocks`` and ``bytes`` (stored in the host tier: the remote bytes belong to the
    remote span)."""
    if not ENABLED:
        return NOOP
    return start_span("store", request_id, blocks=blocks)


def remote_store_span(
    request_id: str, blocks: int, *, parent: Span | _NoopSpan | None = None
) -> Span | _NoopSpan:
    """Worker side: an asynchronous remote PUT of ``blocks`` blocks, from shipping to completion;
    end it in the completion callback with ``remote_blocks`` (stored), ``dropped_blocks`` and
    ``bytes``. ``tier`` is ``remote``."""
    if not ENABLED:
        return NOOP
    return start_span("store.remote", request_id, parent=parent, blocks=blocks, tier="remote")


def configure(tracer_provider: Any = None) -> None:
    """Records spans with ``tracer_provider`` (an SDK ``TracerProvider``: tests, or programs that
    manage their own), whatever the environment says; ``None`` turns tracing off."""
    global _tracer, ENABLED
    with _lock:
        if tracer_provider is None:
            _tracer, ENABLED = None, False
        else:
            _tracer, ENABLED = tracer_provider.get_tracer("membrain", _version()), True


def force_flush(timeout_s: float = 5.0) -> bool:
    """Exports the spans still queued by the provider Membrain created (True when none was)."""
    p = _provider
    return True if p is None else bool(p.force_flush(int(timeout_s * 1000)))


__all__ = [
    "ENABLED",
    "NOOP",
    "Span",
    "configure",
    "force_flush",
    "load_span",
    "lookup_span",
    "remote_store_span",
    "start_span",
    "store_span",
]
