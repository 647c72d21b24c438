"""Ingest answers success only when the blob is durable AND JetStream acknowledged the event."""

from __future__ import annotations

import asyncio

import pytest

from shared import events as ev
from shared.bus import SUBJECT_RECEIVED, Bus
from shared.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def ingest_only(orthanc_nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", orthanc_nodes, services=("ingest",))
    yield stack
    stack.close()


def blob_files(stack) -> list:
    root = stack.data_dir / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def received_events(stack) -> list[ev.InstanceReceivedV1]:
    async def read():
        bus = await Bus.connect(stack.cfg.nats, "test-reader")
        try:
            return [d.event async for d in bus.replay(SUBJECT_RECEIVED)]
        finally:
            await bus.close()

    return asyncio.run(read())


def test_nats_down_means_failure_status_and_nothing_kept(ingest_only, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=303)
    ingest_only.stop_nats()

    result = ingest_only.send(files, extra=["-v"])
    output = result.stdout + result.stderr
    assert "Received Store Response (Refused: OutOfResources)" in output, output
    assert blob_files(ingest_only) == []

    # NATS back (same store): nothing was recorded, and ingest serves again.
    ingest_only.start_nats()
    assert received_events(ingest_only) == []
    wait_for(lambda: ingest_only.metric("ingest", "switchyard_bus_connected") == 1.0, timeout=20,
             what="ingest reconnected to NATS")
    again = ingest_only.send(files, extra=["-v"])
    assert again.returncode == 0 and "Received Store Response (Success)" in again.stdout + again.stderr, again.stderr
    events = received_events(ingest_only)
    assert len(events) == 1 and len(blob_files(ingest_only)) == 1


def test_same_instance_twice_is_recorded_once(ingest_only, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=304)
    for _ in range(2):
        result = ingest_only.send(files, extra=["-v"])
        assert "Received Store Response (Success)" in result.stdout + result.stderr, result.stderr
    events = received_events(ingest_only)
    assert len(events) == 1
    assert events[0].blob_key.startswith("sha256/")
