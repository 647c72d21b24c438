"""Heartbeats on real Orthanc nodes: load, version, Orthanc's own metrics; a stopped node is down."""

from __future__ import annotations

import asyncio

import pytest

from shared import events as ev
from shared.bus import Bus
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration


def last_heartbeat(stack, node_id: str) -> ev.NodeHeartbeatV1 | None:
    async def read():
        bus = await Bus.connect(stack.cfg.nats, "test-reader")
        try:
            beats = [d.event async for d in bus.replay(f"node.heartbeat.{node_id}",
                                                       stream=stack.cfg.nats.heartbeats_stream)]
            return beats[-1] if beats else None
        finally:
            await bus.close()

    return asyncio.run(read())


def test_heartbeat_carries_version_and_orthanc_metrics(stack, live_nodes):
    node = live_nodes[0]
    hb = wait_for(lambda: (b := last_heartbeat(stack, node.node.id)) and b.up and b.metrics and b,
                  timeout=20, what="a heartbeat with metrics")
    assert hb.version == node.client.system()["Version"]
    assert hb.metrics["orthanc_count_instances"] == hb.instance_count
    assert "orthanc_jobs_pending" in hb.metrics
    assert hb.rtt_ms is not None and hb.rtt_ms > 0


def test_a_stopped_node_is_reported_down_with_the_reason(stack, live_nodes):
    node = live_nodes[2]
    node.stop()
    try:
        hb = wait_for(lambda: (b := last_heartbeat(stack, node.node.id)) and not b.up and b,
                      timeout=20, what="a down heartbeat")
        assert hb.error.startswith("REST:")
        assert hb.metrics == {} and hb.version == ""
    finally:
        node.start()
    wait_for(lambda: (b := last_heartbeat(stack, node.node.id)) and b.up, timeout=30, what="node back up")
