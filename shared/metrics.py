"""What every service's metrics share: the HTTP door (/metrics, /healthz, /readyz),
stage latencies with trace exemplars, bounded reason labels, and JetStream consumer lag.

Labels stay bounded and free of patient data: node ids, configured AE titles
(others are ``other``), and the values of ``ReasonLabel`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from shared.events import FailureReason

if TYPE_CHECKING:
    from shared.bus import Bus

log = logging.getLogger(__name__)

# Seconds between two hops: from a few ms (a quiet stack) to minutes (a node down, a re-placement).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class Stage(StrEnum):
    """The ``stage`` label of ``switchyard_stage_seconds``: which two events the time lies between."""

    RECEIVED_TO_PLACED = "received_to_placed"
    PLACED_TO_FORWARDED = "placed_to_forwarded"
    FORWARDED_TO_VERIFIED = "forwarded_to_verified"
    RECEIVED_TO_VERIFIED = "received_to_verified"


class ReasonLabel(StrEnum):
    """The ``reason`` label of dead letters and verification failures.

    FailureReason's values, then the verification outcomes the probe names, then
    ``other``: reason texts are free (they may carry a tag or a status), labels are not.
    """

    NODE_DOWN = FailureReason.NODE_DOWN.value
    NODE_REMOVED = FailureReason.NODE_REMOVED.value
    NOT_SEEN = "not seen"
    GONE = "gone from node"
    DIGEST_MISMATCH = "digest mismatch"
    NOT_DICOM = "not dicom"
    OTHER = "other"


_REASON_PREFIXES = (
    (FailureReason.NODE_DOWN.value, ReasonLabel.NODE_DOWN),
    (FailureReason.NODE_REMOVED.value, ReasonLabel.NODE_REMOVED),
    ("not seen on the node", ReasonLabel.NOT_SEEN),
    ("instance no longer on the node", ReasonLabel.GONE),
    ("dataset digest mismatch", ReasonLabel.DIGEST_MISMATCH),
    ("dataset differs at", ReasonLabel.DIGEST_MISMATCH),
    ("stored file is not DICOM", ReasonLabel.NOT_DICOM),
)


def reason_label(reason: str) -> str:
    """The bounded label for a free-text failure reason."""
    for prefix, label in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return label.value
    return ReasonLabel.OTHER.value


def reason_counter(name: str, doc: str, nodes: Iterable[str], registry: CollectorRegistry) -> Counter:
    """A counter by (node, reason) with every pair at 0: an alert or panel on it has data before the first failure."""
    counter = Counter(name, doc, ["node", "reason"], registry=registry)
    for node in nodes:
        for label in ReasonLabel:
            counter.labels(node=node, reason=label.value)
    return counter


def stage_histogram(registry: CollectorRegistry, stages: Iterable[Stage] = (), nodes: Iterable[str] = ()) -> Histogram:
    """The stage latency histogram, with the (stage, node) pairs given at 0 (a rate needs the 0 before the first)."""
    histogram = Histogram(
        "switchyard_stage_seconds",
        "Time between two events of one instance (stage label), by node",
        ["stage", "node"],
        buckets=STAGE_BUCKETS,
        registry=registry,
    )
    for node in nodes:
        for stage in stages:
            histogram.labels(stage.value, node)
    return histogram


def seconds_since(t: datetime, now: datetime | None = None) -> float:
    """Seconds from an event's occurred_at to now (0 for clock skew into the future)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return max(0.0, ((now or datetime.now(UTC)) - t).total_seconds())


def observe(histogram: Any, seconds: float) -> None:
    """Observe with the active span's trace id as exemplar (served to OpenMetrics scrapes)."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        histogram.observe(seconds, exemplar={"trace_id": format(ctx.trace_id, "032x")})
    else:
        histogram.observe(seconds)


def bounded_ae(ae: str, known: frozenset[str]) -> str:
    """A peer AE title as a label value: configured ones as themselves, every other as ``other``."""
    ae = ae.strip()
    return ae if ae in known else "other"


# -- the HTTP door ---------------------------------------------------------------

# A readiness check: a name and a callable that says whether it holds now.
Check = tuple[str, Callable[[], bool]]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def metrics_app(registry: CollectorRegistry, checks: list[Check]) -> Callable[..., Iterable[bytes]]:
    """/metrics (OpenMetrics when the scraper asks, with exemplars), /healthz (the process answers),
    /readyz (200 only when every check holds; 503 names the ones that do not)."""
    prom = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            failing = []
            for name, check in checks:
                try:
                    ok = check()
                except Exception:  # noqa: BLE001 - a check that raises is a check that fails
                    ok = False
                if not ok:
                    failing.append(name)
            if failing:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [("not ready: " + ", ".join(failing) + "\n").encode()]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ready\n"]
        return prom(environ, start_response)  # type: ignore[no-any-return]

    return app


def serve(registry: CollectorRegistry, host: str, port: int, checks: list[Check]) -> WSGIServer:
    """Start the door on a daemon thread; ``shutdown()`` stops it. IPv6 hosts work too (as
    prometheus_client's own server: the address family comes from the host)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class MetricsServer(_ThreadingServer):
        address_family = family

    server = make_server(host, port, metrics_app(registry, checks), MetricsServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


# -- JetStream consumer lag --------------------------------------------------------


class ConsumerGauges:
    """Each durable consumer this process pulls from, read with consumer_info every ``interval`` s.

    Pending (not yet delivered), ack-pending (delivered, not acked) and
    redelivered (delivered more than once, not yet acked), plus the stream's
    last sequence so an ordered reader's lag is ``last_seq`` minus its own.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["consumer"]
        self.pending = Gauge("switchyard_consumer_pending", "Messages not yet delivered", labels, registry=registry)
        self.ack_pending = Gauge(
            "switchyard_consumer_ack_pending", "Messages delivered, not yet acked", labels, registry=registry
        )
        self.redelivered = Gauge(
            "switchyard_consumer_redelivered",
            "Messages delivered more than once, not yet acked",
            labels,
            registry=registry,
        )
        self.stream_last_seq = Gauge(
            "switchyard_stream_last_seq", "Last sequence of the event stream", ["stream"], registry=registry
        )
        self.stream_bytes = Gauge(
            "switchyard_stream_bytes", "Bytes held by the event stream", ["stream"], registry=registry
        )
        self.stream_messages = Gauge(
            "switchyard_stream_messages", "Messages held by the event stream", ["stream"], registry=registry
        )

    async def run(self, bus: Bus, stop: asyncio.Event, interval: float = 5.0) -> None:
        stream = bus.cfg.events_stream
        while not stop.is_set():
            try:
                info = await bus.js.stream_info(stream)
            except Exception as exc:  # noqa: BLE001 - a lost connection: the next round reads again
                log.debug("stream_info %s: %s", stream, type(exc).__name__)
            else:
                self.stream_last_seq.labels(stream=stream).set(info.state.last_seq)
                self.stream_bytes.labels(stream=stream).set(info.state.bytes)
                self.stream_messages.labels(stream=stream).set(info.state.messages)
            for name in sorted(bus.consumers):
                try:
                    ci = await bus.js.consumer_info(stream, name)
                except Exception as exc:  # noqa: BLE001 - e.g. deleted, or the bus is away
                    log.debug("consumer_info %s: %s", name, type(exc).__name__)
                    continue
                self.pending.labels(consumer=name).set(ci.num_pending or 0)
                self.ack_pending.labels(consumer=name).set(ci.num_ack_pending or 0)
                self.redelivered.labels(consumer=name).set(ci.num_redelivered or 0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
