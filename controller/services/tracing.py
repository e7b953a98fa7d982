"""Traces: each run is one OpenTelemetry trace, exported over OTLP when asked, else nothing.

The tree of a run::

    run                              (the driver that started it; run.id, repo, ref, commit, status)
    ├── lease.wait                   (the driver's acquire; machine.id once granted)
    ├── stage <name>                 (one per attempt; stage.name, stage.attempt, status,
    │   │                             failure.signature and failure.kind when learning gave one)
    │   ├── machine.run              (the machine handle: commands, file reads and writes)
    │   ├── machine.read_file / machine.write_file
    │   └── evidence.upload          (``runs.save_artifact``)
    └── run.resume                   (a later driver of the same run: after a restart, or
                                      another controller that took the run over)

The trace id and the ``run`` span's id are derived from the run's id (:func:`run_ids`), so
every driver of a run adds to the same trace without storing anything: a resumed driver's
``run.resume`` span is a child of the first driver's ``run`` span (which a crashed
controller never exported: the trace then shows that parent as missing, which is what
happened), and an upload through the API (a remote agent's) joins the run's trace too.

A :class:`Tracing` is made once per controller at start-up (``startup.build_controller``):
with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, an SDK tracer provider with one batch processor
exporting OTLP over HTTP/protobuf to ``<endpoint>/v1/traces`` (``OTEL_EXPORTER_OTLP_HEADERS``
and the other ``OTEL_EXPORTER_OTLP_*`` knobs of the exporter apply); otherwise, or with
``OTEL_SDK_DISABLED=true``, it is off: no provider, no exporter, and :meth:`Tracing.span`
answers a shared do-nothing context (under a microsecond a call). No hot route (a
lease, a renew, a release, a session command) makes a span either way.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
)

from controller.settings import Settings

SERVICE_NAME = "shopfloor"
TEXT_CAP = 256
"""Characters of a command or path kept as an attribute."""

Attributes = Mapping[str, Any]
"""Span attributes: str, int, float or bool values; None values are left out."""

_OFF: AbstractContextManager[Span] = nullcontext(INVALID_SPAN)
_FIXED_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "shopfloor_fixed_span_ids", default=None
)


def run_ids(run_id: str) -> tuple[int, int]:
    """The trace id and root span id of a run: the same in every controller, every time."""
    digest = hashlib.sha256(f"shopfloor-run:{run_id}".encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return trace_id, span_id


class _RunIdGenerator(RandomIdGenerator):
    """Random ids, except for a run's root span, whose ids :func:`run_ids` gives."""

    def generate_span_id(self) -> int:
        fixed = _FIXED_IDS.get()
        return fixed[1] if fixed is not None else super().generate_span_id()

    def generate_trace_id(self) -> int:
        fixed = _FIXED_IDS.get()
        return fixed[0] if fixed is not None else super().generate_trace_id()


class Tracing:
    """The controller's tracer; off (a no-op, nothing exported) unless made with a processor."""

    def __init__(self, processor: SpanProcessor | None = None) -> None:
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if processor is not None:
            self.provider = TracerProvider(
                resource=Resource.create({"service.name": SERVICE_NAME}),
                id_generator=_RunIdGenerator(),
            )
            self.provider.add_span_processor(processor)
            self.tracer = self.provider.get_tracer("shopfloor")

    @property
    def on(self) -> bool:
        return self.provider is not None

    def span(
        self, name: str, attributes: Attributes | None = None, *, run_id: str | None = None
    ) -> AbstractContextManager[Span]:
        """A child of the current span. ``run_id``: when no span is current (an upload
        through the API), the span joins that run's trace under its ``run`` span."""
        if self.provider is None:
            return _OFF
        parent = None
        if run_id is not None and not trace.get_current_span().get_span_context().is_valid:
            parent = _run_parent(run_id)
        return self.tracer.start_as_current_span(
            name, context=parent, attributes=_clean(attributes)
        )

    def run_span(
        self, run_id: str, *, resumed: bool, attributes: Attributes | None = None
    ) -> AbstractContextManager[Span]:
        """The span of one driver of a run: the run's root (``run``) for the driver that
        started it, a ``run.resume`` child of that root for any later driver. Exceptions
        are the caller's to record (a controller stopping is no error of the run)."""
        if self.provider is None:
            return _OFF
        values = _clean({"run.id": run_id, "run.resumed": resumed, **(attributes or {})})
        if resumed:
            return self.tracer.start_as_current_span(
                "run.resume",
                context=_run_parent(run_id),
                attributes=values,
                record_exception=False,
                set_status_on_exception=False,
            )
        return self._root(run_id, values)

    @contextmanager
    def _root(self, run_id: str, values: dict[str, Any]) -> Iterator[Span]:
        fixed = _FIXED_IDS.set(run_ids(run_id))
        try:
            root = self.tracer.start_span("run", context=otel_context.Context(), attributes=values)
        finally:
            _FIXED_IDS.reset(fixed)
        with trace.use_span(
            root, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            yield root

    def close(self) -> None:
        """Export what is left and stop (the controller is closing)."""
        if self.provider is not None:
            self.provider.shutdown()


def _run_parent(run_id: str) -> otel_context.Context:
    trace_id, span_id = run_ids(run_id)
    remote = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


def _clean(attributes: Attributes | None) -> dict[str, Any]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}


def short(text: str) -> str:
    return text if len(text) <= TEXT_CAP else text[: TEXT_CAP - 1] + "…"


def failed(span: Span, description: str) -> None:
    """Mark ``span`` as an error with a short reason (no-op when tracing is off)."""
    span.set_status(Status(StatusCode.ERROR, short(description)))


def make(settings: Settings) -> Tracing:
    """The controller's tracing from its settings: OTLP over HTTP when an endpoint is set."""
    endpoint = settings.otel_exporter_otlp_endpoint.strip()
    if not endpoint or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Tracing()
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    return Tracing(BatchSpanProcessor(exporter))


def in_memory(exporter: SpanExporter) -> Tracing:
    """Tracing that hands every ended span to ``exporter`` at once (tests)."""
    return Tracing(SimpleSpanProcessor(exporter))


def share_with_fastapi(tracing: Tracing) -> None:
    """Make the controller's provider the process's global one, if none is set yet, so
    FastAPI's request spans (``SHOPFLOOR_OPENTELEMETRY``) go to the same collector."""
    if tracing.provider is not None and isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    ):
        trace.set_tracer_provider(tracing.provider)
