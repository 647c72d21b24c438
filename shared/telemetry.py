"""Logs, Prometheus metrics and OpenTelemetry traces, set up once per process.

Rule for every caller: UIDs, sizes, node ids and statuses are fine in logs,
span attributes and metric labels; patient names, IDs, birth dates and
accession numbers never are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Link, NoOpTracer, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, start_http_server

from shared.logfmt import install as install_log_formatter

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from shared.config import TelemetryConfig

_propagator = TraceContextTextMapPropagator()


def setup_logging(service: str, level: str = "INFO", log_format: str = "text") -> None:
    """Install the one formatter (shared.logfmt) on the root logger: every logger goes through it."""
    install_log_formatter(service, level, log_format)
    # pynetdicom logs dataset summaries (patient names among them) at DEBUG/INFO.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class TelemetryError(ValueError):
    """An OTEL_* setting this process cannot honour (said at start, not ignored)."""


class _Disabled(TracerProvider):
    """No exporter, or OTEL_SDK_DISABLED: every tracer is a no-op (no ids drawn, nothing recorded)."""

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        return NoOpTracer()


def _env(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def exporters_wanted(cfg: TelemetryConfig, env: Mapping[str, str]) -> list[str]:
    """OTEL_TRACES_EXPORTER (comma list: otlp, console, none) if set, else ``telemetry.traces``."""
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return []
    raw = _env(env, "OTEL_TRACES_EXPORTER") or cfg.traces
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = sorted(set(names) - {"otlp", "console", "none"})
    if unknown:
        raise TelemetryError(f"OTEL_TRACES_EXPORTER: unsupported {', '.join(unknown)} (otlp, console, none)")
    return [] if "none" in names else list(dict.fromkeys(names))


def resource_for(service: str) -> Resource:
    """Switchyard's resource attributes under whatever OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES set
    (read from the environment by the SDK's detector).

    ``switchyard.service`` is always ours, so five processes sharing one
    OTEL_SERVICE_NAME can still be told apart.
    """
    from_env = OTELResourceDetector().detect().attributes
    ours: dict[str, str] = {"service.name": f"switchyard-{service}", "service.namespace": "switchyard"}
    attrs: dict[str, str] = {k: v for k, v in ours.items() if k not in from_env}
    attrs["switchyard.service"] = service
    return Resource.create(attrs)


def sampler_for(cfg: TelemetryConfig, env: Mapping[str, str]) -> Sampler | None:
    """None when OTEL_TRACES_SAMPLER is set (the SDK reads it and its _ARG); else parent-based on ``sample_ratio``."""
    if _env(env, "OTEL_TRACES_SAMPLER"):
        return None
    ratio = cfg.sample_ratio
    if not 0.0 <= ratio <= 1.0:
        raise TelemetryError(f"telemetry.sample_ratio must be in [0, 1], not {ratio}")
    return ParentBased(ALWAYS_ON if ratio >= 1.0 else TraceIdRatioBased(ratio))


def otlp_exporter(cfg: TelemetryConfig, env: Mapping[str, str]) -> SpanExporter:
    """The OTLP span exporter the protocol names; the endpoint from OTEL_* if set, else ``telemetry.otlp_endpoint``.

    The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)HEADERS, _TIMEOUT,
    _COMPRESSION and _CERTIFICATE itself.
    """
    protocol = (
        _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env(env, "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    )
    from_env = bool(_env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT"))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=None if from_env else cfg.otlp_endpoint)
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise TelemetryError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc, which is not"
                " installed; use http/protobuf (port 4318)"
            ) from exc
        # The gRPC exporter reads its endpoint from OTEL_* (default localhost:4317); ours is an HTTP URL.
        exporter: SpanExporter = GrpcSpanExporter()
        return exporter
    raise TelemetryError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported (http/protobuf, grpc)")


def setup_tracing(service: str, cfg: TelemetryConfig) -> TracerProvider:
    """A TracerProvider per the OTEL_* variables, ``telemetry.*`` filling only what they leave unset.

    Spans go through a BatchSpanProcessor only (export off the routing path).
    The SDK reads the environment itself (resource, sampler, exporter), so this does too.
    """
    env = os.environ
    wanted = exporters_wanted(cfg, env)
    if not wanted:
        return _Disabled(resource=Resource.get_empty(), shutdown_on_exit=False)
    provider = TracerProvider(resource=resource_for(service), sampler=sampler_for(cfg, env))
    for name in wanted:
        exporter = ConsoleSpanExporter() if name == "console" else otlp_exporter(cfg, env)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


# -- span helpers shared by the services ------------------------------------------
# Messaging semantic conventions: https://opentelemetry.io/docs/specs/semconv/messaging/

MAX_LINKS = 128


@contextmanager
def span(tracer: trace.Tracer, name: str, **kwargs: Any) -> Iterator[trace.Span]:
    """``start_as_current_span`` that records an escaping exception by its type only.

    The SDK's default records ``str(exc)`` (an exception event and the status
    description); a pydicom or DuckDB message can echo element values.
    """
    with tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False, **kwargs) as s:
        try:
            yield s
        except Exception as exc:
            s.set_attribute("exception.type", type(exc).__qualname__)
            fail(s, type(exc).__qualname__)
            raise


def messaging_attributes(subject: str, operation: str) -> dict[str, str]:
    """``operation``: publish, process or receive."""
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }


def fail(span: trace.Span, description: str) -> None:
    """Mark a span failed with a value-free description (a DICOM status, a reason code)."""
    span.set_status(Status(StatusCode.ERROR, description))


def dicom_status(span: trace.Span, status: int) -> None:
    """``dicom.status`` as 0xNNNN; ERROR unless success or a warning (0xB000-0xBFFF, 0x0107, 0x0116)."""
    span.set_attribute("dicom.status", f"0x{status:04X}")
    if not (status == 0 or 0xB000 <= status <= 0xBFFF or status in (0x0107, 0x0116)):
        fail(span, f"DICOM status 0x{status:04X}")


def links_to(traceparents: Iterable[tuple[str, str]], limit: int = MAX_LINKS) -> list[Link]:
    """Links to the spans that produced some events (at most ``limit``, the first ones)."""
    links: list[Link] = []
    for traceparent, tracestate in traceparents:
        if not traceparent:
            continue
        ctx = trace.get_current_span(context_from(traceparent, tracestate)).get_span_context()
        if ctx.is_valid:
            links.append(Link(ctx))
            if len(links) >= limit:
                break
    return links


def context_of(span: trace.Span) -> tuple[str, str]:
    """(traceparent, tracestate) of ``span`` for an event it produced (("", "") when not recording)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


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
