"""membrain.tracing: no-op (and no opentelemetry import) without an OTLP endpoint; spans with the
SDK's in-memory exporter; a real OTLP/HTTP export to a local collector stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

import membrain

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(membrain.__file__)))


def _run(*parts: str, **env: str) -> subprocess.CompletedProcess:
    """Runs the code pieces (each dedented on its own) in a fresh interpreter, without any
    OTEL_* variable of ours except those in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base.update(env, PYTHONPATH=PKG_PARENT)
    code = "\n".join(textwrap.dedent(p) for p in parts)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=base)


USE_ALL_HELPERS = """
    from membrain import tracing
    with tracing.lookup_span("r1", blocks=4, trace_headers={"traceparent": "x"}) as sp:
        sp.set(local_blocks=0, host_blocks=1, remote_blocks=2)
    with tracing.load_span("r1", blocks=3) as sp:
        sp.set(host_blocks=1, remote_blocks=2, failed_blocks=0, bytes=3)
    with tracing.store_span("r1", blocks=2) as sp:
        r = tracing.remote_store_span("r1", blocks=2, parent=sp)
    r.end(remote_blocks=2, bytes=2)
    tracing.start_span("load", "r2").end()
"""


def test_off_without_endpoint_imports_nothing():
    r = _run(
        USE_ALL_HELPERS,
        """
    import sys
    assert tracing.ENABLED is False
    assert tracing.lookup_span("r", 1) is tracing.NOOP
    bad = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    print("IMPORTED", bad)
    """,
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout


@pytest.mark.parametrize("env", [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_endpoint_but_disabled_imports_nothing(env):
    r = _run(
        USE_ALL_HELPERS,
        """
    import sys
    assert tracing.ENABLED is False
    print("IMPORTED", sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        **env,
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout


def test_endpoint_without_the_packages_turns_off_with_one_warning():
    # A finder that hides opentelemetry stands in for an install without the extra.
    r = _run(
        """
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ImportError("no " + name)
        sys.meta_path.insert(0, Hide())
        import logging
        logging.basicConfig(level=logging.WARNING)
        from membrain import tracing
        assert tracing.ENABLED is True
        """,
        USE_ALL_HELPERS,
        """
        assert tracing.ENABLED is False
        assert tracing.load_span("x", 1) is tracing.NOOP
        print("OK")
        """,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert r.stderr.count("Membrain tracing off") == 1


@pytest.fixture
def memory_spans():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from membrain import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        yield exporter
    finally:
        tracing.configure(None)
        provider.shutdown()


def _by_name(exporter) -> dict:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_spans_and_attributes(memory_spans):
    from membrain import tracing

    assert tracing.ENABLED
    with tracing.lookup_span("req-1", blocks=8) as sp:
        sp.set(local_blocks=2, host_blocks=3, remote_blocks=1)
    with tracing.lookup_span("req-2", blocks=8) as sp:
        sp.set(local_blocks=0, host_blocks=0, remote_blocks=0)
    with tracing.load_span("req-1", blocks=4) as sp:
        sp.set(host_blocks=3, remote_blocks=0, failed_blocks=1, bytes=3 * 4096)
    with tracing.store_span("req-1", blocks=6) as sp:
        sp.set(host_blocks=6, remote_blocks=6, bytes=6 * 4096)
        remote = tracing.remote_store_span("req-1", blocks=6, parent=sp)
    # the remote PUT completes later, on another thread
    t = threading.Thread(
        target=remote.end, kwargs={"remote_blocks": 5, "dropped_blocks": 1, "bytes": 5 * 4096}
    )
    t.start()
    t.join()
    remote.end(remote_blocks=0)  # a second end() is ignored

    spans = memory_spans.get_finished_spans()
    assert [s.name for s in spans] == [
        "membrain.lookup",
        "membrain.lookup",
        "membrain.load",
        "membrain.store",
        "membrain.store.remote",
    ]
    hit, miss, load, store, rstore = (dict(s.attributes) for s in spans)
    assert hit == {
        "membrain.request_id": "req-1",
        "membrain.blocks": 8,
        "membrain.blocks.local": 2,
        "membrain.blocks.host": 3,
        "membrain.blocks.remote": 1,
        "membrain.tier": "host+remote",
        "membrain.outcome": "hit",
    }
    assert miss["membrain.outcome"] == "miss" and miss["membrain.tier"] == "none"
    assert load["membrain.outcome"] == "partial" and load["membrain.tier"] == "host"
    assert load["membrain.blocks.failed"] == 1 and load["membrain.bytes"] == 3 * 4096
    assert store["membrain.outcome"] == "ok" and store["membrain.tier"] == "host+remote"
    assert rstore["membrain.tier"] == "remote" and rstore["membrain.outcome"] == "partial"
    assert rstore["membrain.blocks.remote"] == 5 and rstore["membrain.blocks.dropped"] == 1
    # the remote PUT is a child of the store that shipped it
    assert spans[4].parent is not None and spans[4].parent.span_id == spans[3].context.span_id
    assert spans[4].context.trace_id == spans[3].context.trace_id


def test_error_outcome_and_trace_headers(memory_spans):
    from opentelemetry.trace import StatusCode

    from membrain import tracing

    with pytest.raises(RuntimeError), tracing.load_span("req-9", blocks=2):
        raise RuntimeError("boom")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    with tracing.lookup_span("req-9", blocks=2, trace_headers=headers) as sp:
        sp.set(host_blocks=0, remote_blocks=2)
    err, joined = memory_spans.get_finished_spans()
    assert err.attributes["membrain.outcome"] == "error"
    assert err.status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in err.events)
    assert f"{joined.context.trace_id:032x}" == trace_id  # joined the request's trace
    assert joined.parent.span_id == 0x00F067AA0BA902B7
    assert joined.attributes["membrain.tier"] == "remote"


class _Collector(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Collector.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_real_otlp_http_export():
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    pytest.importorskip("opentelemetry.proto")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Collector.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = _run(
            USE_ALL_HELPERS,
            """
    import json
    assert tracing.ENABLED
    print(json.dumps(tracing.force_flush(10)))
    """,
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{httpd.server_address[1]}",
            OTEL_SERVICE_NAME="membrain-test",
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) is True
    assert _Collector.received, "nothing was exported"
    names, services = [], set()
    for path, ctype, body in _Collector.received:
        assert path == "/v1/traces" and ctype == "application/x-protobuf"
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            services.update(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            names += [s.name for ss in rs.scope_spans for s in ss.spans]
    assert services == {"membrain-test"}
    assert sorted(names) == sorted(
        ["membrain.lookup", "membrain.load", "membrain.store", "membrain.store.remote", "membrain.load"]
    )
