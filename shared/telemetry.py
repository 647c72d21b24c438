"""Logs, Prometheus metrics and OpenTelemetry traces, set up once per process.

Rule for every caller: UIDs, sizes, node ids and statuses are fine in logs,
span attributes and metric labels; patient names, IDs, birth dates and
accession numbers never are.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, start_http_server

from shared.logfmt import install as install_log_formatter

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from shared.config import TelemetryConfig

_propagator = TraceContextTextMapPropagator()


def setup_logging(service: str, level: str = "INFO") -> None:
    """Install the one formatter (shared.logfmt) on the root logger: every logger goes through it."""
    install_log_formatter(service, level)
    # pynetdicom logs dataset summaries (patient names among them) at DEBUG/INFO.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def setup_tracing(service: str, cfg: TelemetryConfig) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"switchyard-{service}"}))
    if cfg.traces == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif cfg.traces == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint)))
    return provider


def start_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics; returns (server, thread) so main can shut it down."""
    return start_http_server(port, addr=host, registry=registry)


def current_trace_context() -> tuple[str, str]:
    """(traceparent, tracestate) of the active span, for an event about to be built."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def context_from(traceparent: str, tracestate: str = "") -> otel_context.Context:
    """The parent context an event carries (its traceparent and tracestate fields)."""
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier)
