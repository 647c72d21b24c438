"""The Prometheus registry -> OTLP conversion, decoded back from the serialized bytes; the OTEL_* choices."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from shared.config import TelemetryConfig
from shared.otlpmetrics import (
    FINAL_TIMEOUT_S,
    MetricsPusher,
    endpoint_for,
    headers_for,
    otlp_wanted,
    start_export,
    to_request,
)
from shared.telemetry import TelemetryError
from tests.fixtures.otlp import start_receiver
from tests.fixtures.util import free_port

START, NOW = 1_000_000_000, 2_000_000_000


def decoded(registry: CollectorRegistry) -> tuple[dict[str, object], dict[str, pb.Metric]]:
    """(resource attributes, metrics by name) of the request as bytes on the wire, parsed again."""
    req = to_request(list(registry.collect()), Resource.create({"service.name": "switchyard-x"}), START, NOW)
    back = ExportMetricsServiceRequest.FromString(req.SerializeToString())
    (rm,) = back.resource_metrics
    (sm,) = rm.scope_metrics
    resource = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
    return resource, {m.name: m for m in sm.metrics}


def attrs(point) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def test_a_counter_is_a_monotonic_cumulative_sum_named_without_total():
    registry = CollectorRegistry()
    c = Counter("switchyard_x_placements", "Placements", ["node", "reason"], registry=registry)
    c.labels(node="node1", reason="affinity").inc(3)
    c.labels(node="node2", reason="least_loaded").inc()
    resource, metrics = decoded(registry)
    assert resource["service.name"] == "switchyard-x"
    m = metrics["switchyard_x_placements"]
    assert m.WhichOneof("data") == "sum" and m.description == "Placements"
    assert m.sum.is_monotonic
    assert m.sum.aggregation_temporality == pb.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    got = {(attrs(p)["node"], attrs(p)["reason"]): p.as_double for p in m.sum.data_points}
    assert got == {("node1", "affinity"): 3.0, ("node2", "least_loaded"): 1.0}
    assert all(p.start_time_unix_nano == START and p.time_unix_nano == NOW for p in m.sum.data_points)
    assert not any(name.endswith(("_total", "_created")) for name in metrics)


def test_a_gauge_is_a_gauge():
    registry = CollectorRegistry()
    g = Gauge("switchyard_x_live", "Live", ["node"], registry=registry)
    g.labels(node="node1").set(1)
    g.labels(node="node2").set(0)
    _, metrics = decoded(registry)
    m = metrics["switchyard_x_live"]
    assert m.WhichOneof("data") == "gauge"
    assert {attrs(p)["node"]: p.as_double for p in m.gauge.data_points} == {"node1": 1.0, "node2": 0.0}


def test_a_labelled_histogram_has_per_bucket_counts_and_bounds_without_inf():
    registry = CollectorRegistry()
    h = Histogram("switchyard_x_seconds", "Time", ["node"], buckets=(0.1, 1.0, 10.0), registry=registry)
    for v in (0.05, 0.5, 0.7, 5.0, 50.0):
        h.labels(node="node1").observe(v)
    h.labels(node="node2").observe(0.2)
    _, metrics = decoded(registry)
    m = metrics["switchyard_x_seconds"]
    assert m.WhichOneof("data") == "histogram"
    assert m.histogram.aggregation_temporality == pb.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    by = {attrs(p)["node"]: p for p in m.histogram.data_points}
    assert set(by) == {"node1", "node2"}
    p1 = by["node1"]
    assert list(p1.explicit_bounds) == [0.1, 1.0, 10.0]
    assert list(p1.bucket_counts) == [1, 2, 1, 1]  # the last: above 10 (+Inf)
    assert p1.count == 5 and p1.sum == pytest.approx(56.25)
    assert attrs(p1) == {"node": "node1"}  # no "le"
    assert list(by["node2"].bucket_counts) == [0, 1, 0, 0] and by["node2"].count == 1
    assert p1.start_time_unix_nano == START


def test_a_summary_keeps_count_and_sum():
    registry = CollectorRegistry()
    s = Summary("switchyard_x_bytes", "Sizes", registry=registry)
    s.observe(10)
    s.observe(30)
    _, metrics = decoded(registry)
    (p,) = metrics["switchyard_x_bytes"].summary.data_points
    assert (p.count, p.sum) == (2, 40.0)


def test_otel_metrics_exporter_wins_over_the_config():
    otlp, prom = TelemetryConfig(metrics="otlp"), TelemetryConfig()
    assert not otlp_wanted(prom, {})
    assert otlp_wanted(otlp, {})
    assert otlp_wanted(prom, {"OTEL_METRICS_EXPORTER": "otlp"})
    assert otlp_wanted(prom, {"OTEL_METRICS_EXPORTER": "prometheus,otlp"})
    assert not otlp_wanted(otlp, {"OTEL_METRICS_EXPORTER": "prometheus"})
    assert not otlp_wanted(otlp, {"OTEL_METRICS_EXPORTER": "none"})
    assert not otlp_wanted(otlp, {"OTEL_SDK_DISABLED": "true"})
    with pytest.raises(TelemetryError, match="console"):
        otlp_wanted(prom, {"OTEL_METRICS_EXPORTER": "console"})


def test_endpoint_and_headers_per_the_spec():
    cfg = TelemetryConfig(otlp_endpoint="http://collector:4318/v1/traces")
    assert endpoint_for(cfg, {}) == "http://collector:4318/v1/metrics"
    assert endpoint_for(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/metrics"
    assert (
        endpoint_for(
            cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/x"}
        )
        == "http://m/x"
    )
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20a,x-tenant=t1",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "authorization=Bearer%20b",
    }
    assert headers_for(env) == {"authorization": "Bearer b", "x-tenant": "t1"}


def test_failures_are_one_warning_per_streak_by_type_and_shutdown_sends_a_last_export(caplog):
    registry = CollectorRegistry()
    Counter("switchyard_x_sent", "Sent", registry=registry).inc(7)
    receiver, stop = start_receiver()
    try:
        dead = MetricsPusher(registry, Resource.create({}), f"http://127.0.0.1:{free_port()}/v1/metrics", {}, 60, 1)
        with caplog.at_level(logging.INFO, logger="shared.otlpmetrics"):
            assert not dead.export(1)
            assert not dead.export(1)
            dead.endpoint = f"{receiver.endpoint}/v1/metrics"
            assert dead.export(1)
            dead.endpoint = f"http://127.0.0.1:{free_port()}/v1/metrics"
            assert not dead.export(1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == ["OTLP metrics export failing: URLError (one line until it recovers)"] * 2
        assert any("recovered" in r.getMessage() for r in caplog.records)

        before = len(receiver.metric_points())
        pusher = MetricsPusher(registry, Resource.create({}), f"{receiver.endpoint}/v1/metrics", {}, 60, 5).start()
        started = time.monotonic()
        pusher.shutdown()  # the 60 s interval has not come round: only the final export sends
        assert time.monotonic() - started < 5
        sent = [p for p in receiver.metric_points()[before:] if p.name == "switchyard_x_sent"]
        assert [p.value for p in sent] == [7.0]
    finally:
        stop()


def test_start_export_reads_the_otel_variables(monkeypatch):
    registry = CollectorRegistry()
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert start_export("scheduler", TelemetryConfig(), registry) is None
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(TelemetryError, match="http/protobuf"):
        start_export("scheduler", TelemetryConfig(), registry)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "soon")
    with pytest.raises(TelemetryError, match="OTEL_METRIC_EXPORT_INTERVAL"):
        start_export("scheduler", TelemetryConfig(), registry)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "250")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "1500")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", f"http://127.0.0.1:{free_port()}/v1/metrics")
    pusher = start_export("scheduler", TelemetryConfig(), registry)
    assert pusher is not None
    try:
        assert (pusher.interval_s, pusher.timeout_s) == (0.25, 1.5)
        attributes = pusher.resource.attributes
        assert attributes["switchyard.service"] == "scheduler" and attributes["service.instance.id"]
    finally:
        pusher.shutdown()


def test_shutdown_does_not_wait_for_a_collector_that_never_answers():
    """A collector that accepts and never replies: the thread's export hangs; shutdown still returns."""
    registry = CollectorRegistry()
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        pusher = MetricsPusher(registry, Resource.create({}), f"http://127.0.0.1:{port}/v1/metrics", {}, 0.01, 30)
        pusher.start()
        silent.settimeout(10)
        conn, _ = silent.accept()  # the thread's export is in flight
        with conn:
            started = time.monotonic()
            pusher.shutdown()
            assert time.monotonic() - started < FINAL_TIMEOUT_S + 2
