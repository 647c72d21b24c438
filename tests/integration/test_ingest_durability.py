"""Ingest answers success only when the blob is durable AND JetStream acknowledged the event."""

from __future__ import annotations

import pytest

from switchyard.corpus import generate_studies
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration


async def test_nats_down_means_failure_status_and_nothing_kept(ingest_only, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=303)
    ingest_only.stop_nats()

    result = ingest_only.send(files, extra=["-v"])
    output = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in output, output
    assert ingest_only.blob_files() == []

    # NATS back (same store): nothing was recorded, and ingest serves again.
    ingest_only.start_nats()
    assert await ingest_only.received_events() == []
    wait_for(
        lambda: ingest_only.metric("ingest", "switchyard_bus_connected") == 1.0,
        timeout=20,
        what="ingest reconnected to NATS",
    )
    again = ingest_only.send(files, extra=["-v"])
    assert again.returncode == 0 and "Received Store Response (Success)" in again.stdout + again.stderr, again.stderr
    events = await ingest_only.received_events()
    assert len(events) == 1 and len(ingest_only.blob_files()) == 1


async def test_same_instance_twice_is_recorded_once(ingest_only, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=304)
    for _ in range(2):
        result = ingest_only.send(files, extra=["-v"])
        assert "Received Store Response (Success)" in result.stdout + result.stderr, result.stderr
    events = await ingest_only.received_events()
    assert len(events) == 1
    assert events[0].blob_key.startswith("sha256/")
