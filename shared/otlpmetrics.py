"""The process's Prometheus registry pushed over OTLP/HTTP (issue #14), beside /metrics.

The installed OpenTelemetry SDK has no Prometheus-client -> OTel bridge (only
the other way round), and every instrument here is a prometheus-client one; so
this reads ``registry.collect()`` and writes the OTLP protobuf itself.
Cumulative temporality throughout, start time = process start (the registry is
per process). Export runs on its own daemon thread: never on the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceProto
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.re import parse_env_headers

from shared.telemetry import TelemetryError, resource_for

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample

    from shared.config import TelemetryConfig

log = logging.getLogger(__name__)

CUMULATIVE = pb.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
SCOPE = "switchyard.prometheus"
DEFAULT_INTERVAL_MS = 60000  # OTEL_METRIC_EXPORT_INTERVAL's default (spec)
DEFAULT_TIMEOUT_MS = 10000
FINAL_TIMEOUT_S = 2.0  # the last export on shutdown must not hold the exit up


def _env(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def otlp_wanted(cfg: TelemetryConfig, env: Mapping[str, str]) -> bool:
    """OTEL_METRICS_EXPORTER (comma list: otlp, prometheus, none) if set, else ``telemetry.metrics``.

    /metrics is served whatever this says; only "otlp" adds the push.
    """
    if _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return False
    raw = _env(env, "OTEL_METRICS_EXPORTER") or cfg.metrics
    names = {n.strip().lower() for n in raw.split(",") if n.strip()}
    unknown = sorted(names - {"otlp", "prometheus", "none"})
    if unknown:
        raise TelemetryError(f"OTEL_METRICS_EXPORTER: unsupported {', '.join(unknown)} (otlp, prometheus, none)")
    return "otlp" in names and "none" not in names


def endpoint_for(cfg: TelemetryConfig, env: Mapping[str, str]) -> str:
    """OTEL_EXPORTER_OTLP_METRICS_ENDPOINT as is; else OTEL_EXPORTER_OTLP_ENDPOINT + /v1/metrics;
    else the traces endpoint of the config with /v1/metrics for its path."""
    if url := _env(env, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        return url
    if base := _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT"):
        return base.rstrip("/") + "/v1/metrics"
    traces = cfg.otlp_endpoint.rstrip("/")
    base = traces.removesuffix("/v1/traces")
    return base + "/v1/metrics"


def headers_for(env: Mapping[str, str]) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS, then _METRICS_HEADERS over them (W3C baggage format, %-encoded)."""
    headers = dict(parse_env_headers(_env(env, "OTEL_EXPORTER_OTLP_HEADERS"), liberal=True))
    headers.update(parse_env_headers(_env(env, "OTEL_EXPORTER_OTLP_METRICS_HEADERS"), liberal=True))
    return headers


def _ms(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _env(env, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TelemetryError(f"{name} must be a whole number of milliseconds, not {raw!r}") from None
    if value <= 0:
        raise TelemetryError(f"{name} must be positive, not {value}")
    return value


# -- conversion ------------------------------------------------------------------


def _any(value: object) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _attributes(items: Iterable[tuple[str, object]]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any(v)) for k, v in items]


def resource_proto(resource: Resource) -> ResourceProto:
    return ResourceProto(attributes=_attributes(sorted(resource.attributes.items())))


def _labels(sample: Sample, drop: str = "") -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in sample.labels.items() if k != drop))


def _histogram(family: Metric, start_ns: int, now_ns: int) -> pb.Metric:
    """Prometheus cumulative ``le`` buckets -> per-bucket counts; bounds without +Inf."""
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for s in family.samples:
        if s.name == family.name + "_bucket":
            buckets.setdefault(_labels(s, "le"), []).append((float(s.labels["le"]), s.value))
        elif s.name == family.name + "_sum":
            sums[_labels(s)] = s.value
        elif s.name == family.name + "_count":
            counts[_labels(s)] = s.value
    points = []
    for key, cumulative in buckets.items():
        cumulative.sort()
        per_bucket, previous = [], 0.0
        for _, c in cumulative:
            per_bucket.append(int(c - previous))
            previous = c
        bounds = [le for le, _ in cumulative if le != float("inf")]
        if len(per_bucket) == len(bounds):  # no +Inf bucket (not from prometheus-client): add the empty overflow
            per_bucket.append(0)
        points.append(
            pb.HistogramDataPoint(
                attributes=_attributes(key),
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                count=int(counts.get(key, previous)),
                sum=sums.get(key, 0.0),
                bucket_counts=per_bucket,
                explicit_bounds=bounds,
            )
        )
    return pb.Metric(
        name=family.name,
        description=family.documentation,
        unit=family.unit,
        histogram=pb.Histogram(data_points=points, aggregation_temporality=CUMULATIVE),
    )


def _summary(family: Metric, start_ns: int, now_ns: int) -> pb.Metric:
    """Count and sum (prometheus-client summaries keep no quantiles; any ``quantile`` samples go along)."""
    points: dict[tuple[tuple[str, str], ...], pb.SummaryDataPoint] = {}

    def point(key: tuple[tuple[str, str], ...]) -> pb.SummaryDataPoint:
        if key not in points:
            points[key] = pb.SummaryDataPoint(
                attributes=_attributes(key), start_time_unix_nano=start_ns, time_unix_nano=now_ns
            )
        return points[key]

    for s in family.samples:
        if s.name == family.name + "_sum":
            point(_labels(s)).sum = s.value
        elif s.name == family.name + "_count":
            point(_labels(s)).count = int(s.value)
        elif s.name == family.name and "quantile" in s.labels:
            q = pb.SummaryDataPoint.ValueAtQuantile(quantile=float(s.labels["quantile"]), value=s.value)
            point(_labels(s, "quantile")).quantile_values.append(q)
    return pb.Metric(
        name=family.name,
        description=family.documentation,
        unit=family.unit,
        summary=pb.Summary(data_points=list(points.values())),
    )


def convert(family: Metric, start_ns: int, now_ns: int) -> pb.Metric | None:
    """One Prometheus metric family as one OTLP metric; None for kinds with no simple mapping."""
    if family.type == "counter":
        points = [
            pb.NumberDataPoint(
                attributes=_attributes(_labels(s)),
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                as_double=s.value,
            )
            for s in family.samples
            if s.name == family.name + "_total"
        ]
        return pb.Metric(
            name=family.name,
            description=family.documentation,
            unit=family.unit,
            sum=pb.Sum(data_points=points, aggregation_temporality=CUMULATIVE, is_monotonic=True),
        )
    if family.type in ("gauge", "info", "unknown"):
        name = family.name + "_info" if family.type == "info" else family.name
        points = [
            pb.NumberDataPoint(attributes=_attributes(_labels(s)), time_unix_nano=now_ns, as_double=s.value)
            for s in family.samples
            if s.name == name
        ]
        return pb.Metric(
            name=name, description=family.documentation, unit=family.unit, gauge=pb.Gauge(data_points=points)
        )
    if family.type == "histogram":
        return _histogram(family, start_ns, now_ns)
    if family.type == "summary":
        return _summary(family, start_ns, now_ns)
    return None  # stateset, gaugehistogram: none registered here


def to_request(
    families: Sequence[Metric], resource: Resource, start_ns: int, now_ns: int
) -> ExportMetricsServiceRequest:
    """The whole registry as one request: one resource, one scope."""
    metrics = [m for m in (convert(f, start_ns, now_ns) for f in families) if m is not None]
    return ExportMetricsServiceRequest(
        resource_metrics=[
            pb.ResourceMetrics(
                resource=resource_proto(resource),
                scope_metrics=[pb.ScopeMetrics(scope=InstrumentationScope(name=SCOPE), metrics=metrics)],
            )
        ]
    )


# -- the periodic exporter ---------------------------------------------------------


class MetricsPusher:
    """Collects and POSTs every ``interval_s`` on a daemon thread; ``shutdown`` sends one last time."""

    def __init__(
        self,
        registry: CollectorRegistry,
        resource: Resource,
        endpoint: str,
        headers: Mapping[str, str],
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self.registry = registry
        self.resource = resource
        self.endpoint = endpoint
        self.headers = {"Content-Type": "application/x-protobuf", **headers}
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.start_ns = process_start_ns()
        self.failing = False
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="otlp-metrics", daemon=True)

    def start(self) -> MetricsPusher:
        self._thread.start()
        return self

    def export(self, timeout_s: float) -> bool:
        """One collect and POST; a failure is logged once per streak, by exception type only."""
        try:
            body = to_request(list(self.registry.collect()), self.resource, self.start_ns, time.time_ns())
            req = urllib.request.Request(self.endpoint, body.SerializeToString(), self.headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - operator's URL
                resp.read()
        except Exception as exc:  # noqa: BLE001 - the collector being away must not stop the service
            if not self.failing:
                log.warning("OTLP metrics export failing: %s (one line until it recovers)", type(exc).__qualname__)
            self.failing = True
            return False
        if self.failing:
            log.info("OTLP metrics export recovered")
        self.failing = False
        self.sent += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.export(self.timeout_s)

    def shutdown(self) -> None:
        """Stop the thread and send the final counts, in about FINAL_TIMEOUT_S at most each.

        An export still hanging on the thread is left to its daemon thread (no final one then).
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(FINAL_TIMEOUT_S)
        if not self._thread.is_alive():
            self.export(min(self.timeout_s, FINAL_TIMEOUT_S))


def process_start_ns() -> int:
    """This process's start (from /proc, as prometheus-client's process collector reads it), else now."""
    try:
        with open("/proc/self/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return int((btime + start_ticks / os.sysconf("SC_CLK_TCK")) * 1e9)
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time_ns()


def metrics_resource(service: str) -> Resource:
    """The traces' resource plus a ``service.instance.id`` (unless OTEL_RESOURCE_ATTRIBUTES sets one).

    Cumulative series from two processes under one identity (ingest's extra
    workers) would interleave at the collector; the instance id keeps them apart.
    """
    resource = resource_for(service)
    if "service.instance.id" in resource.attributes:
        return resource
    return resource.merge(Resource({"service.instance.id": str(uuid.uuid4())}))


def start_export(service: str, cfg: TelemetryConfig, registry: CollectorRegistry) -> MetricsPusher | None:
    """A started pusher when the OTEL_* variables (or ``telemetry.metrics``) ask for OTLP, else None."""
    env = os.environ
    if not otlp_wanted(cfg, env):
        return None
    protocol = (
        _env(env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or _env(env, "OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    )
    if protocol != "http/protobuf":
        raise TelemetryError(f"OTLP metrics go over http/protobuf only, not {protocol!r}")
    interval = _ms(env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS)
    timeout = _ms(env, "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", 0) or _ms(
        env, "OTEL_EXPORTER_OTLP_TIMEOUT", DEFAULT_TIMEOUT_MS
    )
    pusher = MetricsPusher(
        registry, metrics_resource(service), endpoint_for(cfg, env), headers_for(env), interval / 1000, timeout / 1000
    )
    return pusher.start()
