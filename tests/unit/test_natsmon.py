"""The probe's export of nats-server's monitoring endpoint says when it cannot read it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.natsmon import NatsMonitorCollector
from tests.fixtures.util import free_port


def test_an_unreachable_monitoring_port_is_nats_up_0_and_nothing_else():
    registry = CollectorRegistry()
    registry.register(NatsMonitorCollector(f"http://127.0.0.1:{free_port()}", timeout=1.0))
    samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    assert [(s.name, s.value) for s in samples] == [("switchyard_nats_up", 0.0)]
