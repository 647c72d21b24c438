"""nats-server's monitoring endpoint (/varz, /jsz) as Prometheus samples, read at scrape time.

Neither PyPI nor Debian ships prometheus-nats-exporter; the handful of numbers
an operator alerts on (is it up, connections, message rates, slow consumers,
JetStream storage) are two JSON reads per scrape. The probe serves them when
``probe.nats_monitor_url`` is set. The monitoring port answers without
credentials: keep it off public networks (docs/security.md).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# (metric suffix, /varz key, help, counter?)
_VARZ = (
    ("connections", "connections", "Client connections now", False),
    ("slow_consumers", "slow_consumers", "Clients the server dropped as too slow", True),
    ("in_msgs", "in_msgs", "Messages received by the server", True),
    ("out_msgs", "out_msgs", "Messages sent by the server", True),
    ("in_bytes", "in_bytes", "Bytes received by the server", True),
    ("out_bytes", "out_bytes", "Bytes sent by the server", True),
    ("mem_bytes", "mem", "Resident memory of nats-server", False),
)
_JSZ = (
    ("jetstream_streams", "streams", "JetStream streams"),
    ("jetstream_consumers", "consumers", "JetStream consumers"),
    ("jetstream_messages", "messages", "Messages held by JetStream"),
    ("jetstream_storage_bytes", "storage", "File storage used by JetStream"),
    ("jetstream_memory_bytes", "memory", "Memory storage used by JetStream"),
)


class NatsMonitorCollector(Collector):
    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=self.timeout) as r:  # noqa: S310 - configured URL
            return dict(json.loads(r.read()))

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily("switchyard_nats_up", "1 when nats-server's monitoring endpoint answered this scrape")
        try:
            varz, jsz = self._get("/varz"), self._get("/jsz")
        except (OSError, ValueError):
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        for name, key, doc, counter in _VARZ:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(f"switchyard_nats_{name}", doc, value=_num(varz.get(key)))
        for name, key, doc in _JSZ:
            yield GaugeMetricFamily(f"switchyard_nats_{name}", doc, value=_num(jsz.get(key)))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected at scrape time only (no request at registration)


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
