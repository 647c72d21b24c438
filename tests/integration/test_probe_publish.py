"""Publish-then-settle with pipelined publishes, on a real nats-server."""

from __future__ import annotations

import pytest
from nats.js.api import PubAck, StreamConfig
from prometheus_client import CollectorRegistry

from services.probe.store import ProbeStore
from services.probe.verify import Verifier
from shared import events as ev
from shared.bus import Bus, BusUnavailable
from shared.config import NodeConfig
from tests.factories import forwarded_from as forwarded
from tests.factories import placed_on as placed

pytestmark = pytest.mark.integration


async def test_only_acknowledged_outcomes_are_settled(nats_only, tmp_path):
    """A stream that records node1's outcomes but not node2's: node2's stays pending, to be published again."""
    cfg = nats_only.cfg
    store = ProbeStore(tmp_path / "probe.duckdb")
    bus = await Bus.connect(cfg.nats, "test-probe", identity="harness")
    try:
        await bus.js.delete_stream(cfg.nats.events_stream)  # declared by the fixture; it would overlap
        await bus.js.add_stream(StreamConfig(name="ONLY_NODE1", subjects=["dicom.instance.verified.node1"]))
        p1, p2 = placed("1.1", "node1"), placed("1.2", "node2")
        store.apply([(1, p1), (2, forwarded(p1)), (3, p2), (4, forwarded(p2))])
        store.record_changes("node1", [("1.1", "o1", 1, "d1")], 1)
        store.record_changes("node2", [("1.2", "o2", 1, "d1")], 1)
        (item1,), (item2,) = store.ready_to_check("node1"), store.ready_to_check("node2")
        registry = CollectorRegistry()
        verifier = Verifier(cfg, store, bus, registry)
        with pytest.raises(BusUnavailable):
            await verifier.publish(
                NodeConfig(id="node1", dicom_port=1, rest_url="http://127.0.0.1:1"),
                [(item1, True, "d1", ""), (item2, True, "d1", "")],
            )
        assert store.states() == {("node1", "1.1"): "verified", ("node2", "1.2"): "pending"}
        published = {
            node: registry.get_sample_value(
                "switchyard_probe_verifications_total", {"node": node, "outcome": "verified"}
            )
            for node in ("node1", "node2")
        }
        assert published == {"node1": 1.0, "node2": None}
        # Published again (a crash between publish and settle): the log keeps one copy.
        acks = await bus.publish_many(
            [
                ev.InstanceVerifiedV1(
                    event_id=ev.fact_id("verified", "node1", "1.1", p1.event_id),
                    sop_instance_uid="1.1",
                    study_instance_uid="1.2",
                    node_id="node1",
                    placement_id=p1.event_id,
                    dataset_digest="d1",
                )
            ]
        )
        assert isinstance(acks[0], PubAck) and acks[0].duplicate
    finally:
        await bus.close()
        store.close()
