"""Heartbeats on real Orthanc nodes: load, version, Orthanc's own metrics; a stopped node is down."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared import events as ev
from tests.fixtures.servers import log_events
from tests.fixtures.util import poll

pytestmark = pytest.mark.integration


async def last_heartbeat(stack, node_id: str) -> ev.NodeHeartbeatV1 | None:
    beats = await log_events(stack, subject=f"node.heartbeat.{node_id}", stream=stack.cfg.nats.heartbeats_stream)
    return beats[-1] if beats else None


async def heartbeat_where(
    stack, node_id: str, test: Callable[[ev.NodeHeartbeatV1], object]
) -> ev.NodeHeartbeatV1 | None:
    """The node's last heartbeat if it passes ``test``: a condition to poll."""
    b = await last_heartbeat(stack, node_id)
    return b if b and test(b) else None


async def test_heartbeat_carries_version_and_orthanc_metrics(stack, live_nodes):
    node = live_nodes[0]
    hb = await poll(
        lambda: heartbeat_where(stack, node.node.id, lambda b: b.up and b.metrics),
        timeout=20,
        what="a heartbeat with metrics",
    )
    assert hb.version == node.client.system()["Version"]
    assert hb.metrics["orthanc_count_instances"] == hb.instance_count
    assert "orthanc_jobs_pending" in hb.metrics
    assert hb.rtt_ms is not None and hb.rtt_ms > 0


async def test_a_stopped_node_is_reported_down_with_the_reason(stack, live_nodes):
    node = live_nodes[2]
    node.stop()
    try:
        hb = await poll(
            lambda: heartbeat_where(stack, node.node.id, lambda b: not b.up), timeout=20, what="a down heartbeat"
        )
        assert hb.error.startswith("REST:")
        assert hb.metrics == {} and hb.version == ""
    finally:
        node.start()
    await poll(lambda: heartbeat_where(stack, node.node.id, lambda b: b.up), timeout=30, what="node back up")
