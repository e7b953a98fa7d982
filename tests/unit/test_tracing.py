"""Traces (services/tracing.py): off without an endpoint, OTLP over HTTP with one, and a
run's ids the same in every controller."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller.services import tracing
from controller.settings import Settings


class _Collector(ThreadingHTTPServer):
    """A stand-in OTLP/HTTP collector: keeps (path, body) of every POST."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _spans(traces: tracing.Tracing) -> None:
    with traces.run_span("r-1", resumed=False, attributes={"repo": "/src/app"}):
        with traces.span("stage plan", {"stage.name": "plan", "stage.attempt": 1}):
            with traces.span("machine.run", {"command": "make test"}):
                pass
    traces.close()


def test_without_an_endpoint_nothing_is_made_or_exported(
    tmp_path: Path, collector: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    # Even the exporter's own variables do not turn it on: only the endpoint does.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/v1/traces")
    traces = tracing.make(Settings(data_dir=tmp_path))
    assert not traces.on
    assert traces.provider is None  # no SDK provider, so no processor and no exporter
    assert isinstance(traces.tracer, trace.NoOpTracer)
    with traces.span("machine.run", {"command": "true"}) as span:
        assert not span.is_recording()
    with traces.run_span("r-1", resumed=False) as root:
        assert not root.is_recording()
    _spans(traces)
    time.sleep(0.3)
    assert collector.received == []


def test_sdk_disabled_turns_it_off_even_with_an_endpoint(
    tmp_path: Path, collector: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    traces = tracing.make(Settings(data_dir=tmp_path, otel_exporter_otlp_endpoint=collector.url))
    assert not traces.on
    _spans(traces)
    assert collector.received == []


def test_with_an_endpoint_spans_go_over_otlp_http(
    tmp_path: Path, collector: _Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url + "/")
    settings = Settings(data_dir=tmp_path)  # the standard variable, no SHOPFLOOR_ prefix
    assert settings.otel_exporter_otlp_endpoint == collector.url + "/"
    traces = tracing.make(settings)
    assert traces.on
    _spans(traces)  # close() flushes the batch
    assert [path for path, _ in collector.received] == ["/v1/traces"]
    body = collector.received[0][1]
    for text in (b"stage plan", b"machine.run", b"make test", b"shopfloor", b"r-1"):
        assert text in body


def test_every_driver_of_a_run_and_its_uploads_share_one_trace() -> None:
    exporter = InMemorySpanExporter()
    traces = tracing.in_memory(exporter)
    trace_id, root_id = tracing.run_ids("r-7")
    assert tracing.run_ids("r-7") == (trace_id, root_id) != tracing.run_ids("r-8")
    with traces.run_span("r-7", resumed=False):
        with traces.span("stage a", {"stage.attempt": 1, "machine.id": None}):
            pass
    with traces.run_span("r-7", resumed=True):  # after a restart, in another controller
        pass
    with traces.span("evidence.upload", {"run.id": "r-7"}, run_id="r-7"):  # over the API
        pass
    with traces.span("other"):  # no run: a trace of its own
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root, stage, resume, upload = (
        spans[n] for n in ("run", "stage a", "run.resume", "evidence.upload")
    )
    assert root.parent is None
    assert root.context is not None
    assert (root.context.trace_id, root.context.span_id) == (trace_id, root_id)
    assert stage.parent is not None
    assert stage.parent.span_id == root_id
    assert "machine.id" not in (stage.attributes or {})  # None values are left out
    for span in (resume, upload):
        assert span.context is not None
        assert span.context.trace_id == trace_id
        assert span.parent is not None
        assert span.parent.span_id == root_id
    assert (resume.attributes or {})["run.resumed"] is True
    other = spans["other"]
    assert other.context is not None
    assert other.context.trace_id != trace_id


def test_off_costs_next_to_nothing() -> None:
    traces = tracing.Tracing()
    n = 100_000
    began = time.perf_counter()
    for _ in range(n):
        with traces.span("machine.run", {"machine.id": "m"}):
            pass
    per_call = (time.perf_counter() - began) / n
    assert per_call < 20e-6, per_call  # measured ~0.4 µs; a lease's hot path is ~1 ms
