"""Tracing setup from OTEL_* and telemetry.*, the span helpers, and the JSON log format."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer, StatusCode

from shared import logfmt, telemetry
from shared.config import ConfigError, TelemetryConfig, load_config

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_tracing_off_by_default_draws_no_ids() -> None:
    provider = telemetry.setup_tracing("ingest", TelemetryConfig())
    tracer = provider.get_tracer("t")
    assert isinstance(tracer, NoOpTracer)
    with tracer.start_as_current_span("x"):
        assert telemetry.current_trace_context() == ("", "")


def test_otel_traces_exporter_wins_over_the_config() -> None:
    assert telemetry.exporters_wanted(TelemetryConfig(traces="otlp"), {}) == ["otlp"]
    assert telemetry.exporters_wanted(TelemetryConfig(traces="none"), {"OTEL_TRACES_EXPORTER": "console"}) == [
        "console"
    ]
    assert telemetry.exporters_wanted(TelemetryConfig(traces="otlp"), {"OTEL_TRACES_EXPORTER": "none"}) == []
    assert telemetry.exporters_wanted(TelemetryConfig(traces="otlp"), {"OTEL_SDK_DISABLED": "true"}) == []
    with pytest.raises(telemetry.TelemetryError, match="zipkin"):
        telemetry.exporters_wanted(TelemetryConfig(), {"OTEL_TRACES_EXPORTER": "zipkin"})


def test_sampler_from_config_unless_otel_traces_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = telemetry.sampler_for(TelemetryConfig(sample_ratio=0.1), {})
    assert sampler is not None and "TraceIdRatioBased{0.1}" in sampler.get_description()
    assert "ParentBased" in sampler.get_description()
    with pytest.raises(telemetry.TelemetryError):
        telemetry.sampler_for(TelemetryConfig(sample_ratio=1.5), {})
    # OTEL_TRACES_SAMPLER set: the SDK reads it (and its argument) itself.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = telemetry.setup_tracing("scheduler", TelemetryConfig(sample_ratio=1.0))
    try:
        assert provider.sampler.get_description() == "TraceIdRatioBased{0.25}"
    finally:
        provider.shutdown()


def test_resource_names_the_service_unless_otel_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    attrs = telemetry.resource_for("probe").attributes
    assert attrs["service.name"] == "switchyard-probe"
    assert attrs["switchyard.service"] == "probe"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,team=imaging")
    attrs = telemetry.resource_for("probe").attributes
    assert attrs["service.name"] == "from-attrs" and attrs["team"] == "imaging"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-name")
    attrs = telemetry.resource_for("probe").attributes
    assert attrs["service.name"] == "from-name"
    assert attrs["switchyard.service"] == "probe"


def test_unsupported_protocols_are_said_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(telemetry.TelemetryError, match="http/json"):
        telemetry.setup_tracing("ingest", TelemetryConfig())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(telemetry.TelemetryError, match="grpc"):
            telemetry.setup_tracing("ingest", TelemetryConfig())


def test_dicom_status_marks_failures_only(spans) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("t")
    for status in (0x0000, 0xB000, 0xA700, 0xC000, 0xA900):
        with tracer.start_as_current_span(f"s{status:04X}") as span:
            telemetry.dicom_status(span, status)
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert got["s0000"].status.status_code == StatusCode.UNSET
    assert got["sB000"].status.status_code == StatusCode.UNSET
    for name, shown in (("sA700", "0xA700"), ("sC000", "0xC000"), ("sA900", "0xA900")):
        assert got[name].status.status_code == StatusCode.ERROR
        assert got[name].status.description == f"DICOM status {shown}"
        assert got[name].attributes["dicom.status"] == shown


def test_an_event_context_makes_the_next_span_a_child(spans) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("producer") as producer:
        carried = telemetry.context_of(producer)
        assert carried == telemetry.current_trace_context()
    with tracer.start_as_current_span("consumer", context=telemetry.context_from(*carried)):
        pass
    producer_span, consumer_span = exporter.get_finished_spans()
    assert consumer_span.parent is not None
    assert consumer_span.parent.span_id == producer_span.context.span_id
    assert consumer_span.context.trace_id == producer_span.context.trace_id


def test_links_are_capped_and_skip_empty_contexts(spans) -> None:
    provider, _ = spans
    tracer = provider.get_tracer("t")
    contexts = [("", "")]
    for _ in range(200):
        with tracer.start_as_current_span("e") as s:
            contexts.append(telemetry.context_of(s))
    links = telemetry.links_to(contexts)
    assert len(links) == telemetry.MAX_LINKS
    assert telemetry.links_to([("", ""), ("garbage", "")]) == []


def test_messaging_attributes_follow_the_semantic_conventions() -> None:
    assert telemetry.messaging_attributes("dicom.instance.received", "publish") == {
        "messaging.system": "nats",
        "messaging.destination.name": "dicom.instance.received",
        "messaging.operation.type": "publish",
    }


# -- JSON logs ----------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    handler = logfmt.install("ingest", "INFO", "json")
    out = io.StringIO()
    handler.setStream(out)
    yield out
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_json_lines_carry_the_active_span(json_log: io.StringIO, spans) -> None:
    provider, _ = spans
    with provider.get_tracer("t").start_as_current_span("work") as span:
        logging.getLogger("switchyard.ingest").info("accepted %s\nforged", "1.2.3")
        ctx = span.get_span_context()
    logging.getLogger("aiohttp.access").warning("outside")
    first, second = (json.loads(line) for line in json_log.getvalue().splitlines())
    assert first["trace_id"] == f"{ctx.trace_id:032x}"
    assert first["span_id"] == f"{ctx.span_id:016x}"
    assert first["service"] == "ingest" and first["logger"] == "switchyard.ingest" and first["level"] == "INFO"
    assert first["message"] == "accepted 1.2.3\\x0aforged"
    assert first["time"].endswith("Z")
    assert "trace_id" not in second and second["logger"] == "aiohttp.access"


def test_json_lines_keep_the_exception_rule(json_log: io.StringIO) -> None:
    import pydicom

    secret = "".join(["Senti", "nel^Pätient"])  # not in the traceback's source lines either
    try:
        pydicom.valuerep.IS(secret)  # type: ignore[attr-defined]
    except ValueError as exc:
        assert secret in str(exc)  # the case the rule guards against
        logging.getLogger("switchyard.x").exception("failed")
    text = json_log.getvalue()
    records = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    (failed,) = [r for r in records if r["logger"] == "switchyard.x"]
    assert isinstance(failed["exception"], list) and failed["exception"]
    assert secret not in text


def test_log_format_from_config_and_env() -> None:
    assert load_config(env={"SWITCHYARD_TELEMETRY__LOG_FORMAT": "json"}).telemetry.log_format == "json"
    assert load_config(env={}).telemetry.log_format == "text"
    with pytest.raises(ConfigError):
        load_config(env={"SWITCHYARD_TELEMETRY__LOG_FORMAT": "xml"})
    with pytest.raises(ValueError):
        logfmt.install("x", "INFO", "xml")


def test_an_escaping_exception_is_recorded_by_type_only(spans) -> None:
    provider, exporter = spans
    secret = "".join(["DOE^", "JANE"])  # what a DuckDB or pydicom message may echo
    with pytest.raises(ValueError):
        with telemetry.span(provider.get_tracer("t"), "apply"):
            raise ValueError(f"Could not convert string '{secret}' to INT32")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "ValueError"
    assert span.attributes is not None and span.attributes["exception.type"] == "ValueError"
    assert not span.events  # no exception event (it would carry the message)
    assert secret not in repr(span.to_json())
