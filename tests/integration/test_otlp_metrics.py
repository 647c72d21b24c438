"""OTEL_METRICS_EXPORTER=otlp: real service processes push their Prometheus registry to a real OTLP/HTTP
receiver (with the OTEL_EXPORTER_OTLP_HEADERS token), /metrics still served, no patient value in any point."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from switchyard.corpus import generate_studies
from tests.fixtures.otlp import ReceivedPoint, start_receiver
from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

PATIENT = {
    "PatientName": "METRICZ^SECRETQ",
    "PatientID": "PIDMQ7Z31",
    "PatientBirthDate": "18990418",
    "AccessionNumber": "ACCMQ9X44",
}
TOKEN = "otel-metrics-token-1"


def one_instance(tmp_path: Path) -> Path:
    (path,) = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=14143)
    ds = pydicom.dcmread(path)
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def placed(points: list[ReceivedPoint]) -> tuple[ReceivedPoint, ReceivedPoint] | None:
    """The scheduler's placement counter and decision histogram once both show the placement."""
    sched = [p for p in points if p.resource.get("switchyard.service") == "scheduler"]
    sums = [p for p in sched if p.name == "switchyard_scheduler_placements" and p.value >= 1]
    hist = [p for p in sched if p.name == "switchyard_scheduler_decision_seconds" and p.count >= 1]
    return (sums[-1], hist[-1]) if sums and hist else None


async def test_metrics_go_out_over_otlp(live_nodes, tmp_path, monkeypatch):
    receiver, stop = start_receiver(token=TOKEN)
    try:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization=Bearer%20{TOKEN}")
        stack = make_stack(tmp_path / "stack", live_nodes, services=("ingest", "scheduler", "probe"))
        try:
            # /metrics is still served beside the push.
            wait_for(
                lambda: stack.metric("scheduler", "switchyard_scheduler_node_live", 'node="node1"') == 1.0,
                30,
                what="node1 live on /metrics",
            )
            assert stack.send([one_instance(tmp_path)]).returncode == 0
            counter, histogram = wait_for(lambda: placed(receiver.metric_points()), 60, 0.2, "the placement over OTLP")
        finally:
            stack.close()
    finally:
        stop()

    assert receiver.refused == 0  # the header was sent
    assert counter.kind == "sum" and counter.monotonic
    assert set(counter.attributes) == {"node", "reason"}
    assert counter.resource["service.name"] == "switchyard-scheduler"
    assert histogram.kind == "histogram"
    assert histogram.bounds and len(histogram.bucket_counts) == len(histogram.bounds) + 1
    assert sum(histogram.bucket_counts) == histogram.count
    points = receiver.metric_points()
    assert {p.resource.get("switchyard.service") for p in points} >= {"ingest", "scheduler", "probe"}
    stage = [p for p in points if p.name == "switchyard_stage_seconds" and p.kind == "histogram"]
    assert stage and all({"stage", "node"} <= set(p.attributes) for p in stage)
    carried = [str(x) for p in points for kv in (p.attributes, p.resource) for item in kv.items() for x in item]
    carried += [p.name for p in points]
    for value in PATIENT.values():
        for part in value.split("^"):
            assert not any(part in text for text in carried), f"{part} in a metric point"
