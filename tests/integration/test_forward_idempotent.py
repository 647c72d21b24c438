"""Delivery is idempotent against the node: a placement whose ack was lost is not handed back
when its node holds it, and a node marked down keeps no association open.

The scheduler is stood in for (placements and the ``down`` state published as it would), so
the node stays down exactly as long as the test says; everything else is real: ingest,
the forwarder, nats-server, Orthanc nodes, the DICOM wire.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from services.forwarder.sender import NodeSender
from shared import events as ev
from shared import membership
from shared.blobs import open_blob_store
from shared.bus import Bus, forwarder_consumer
from tests.factories import placed_from
from tests.fixtures.servers import log_events, new_orthanc_node
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import standing_in_for_the_scheduler

pytestmark = pytest.mark.integration


def short_ack_wait(cfg):
    """Unacked placements come back after 2 s (a lost ack), not after a minute."""
    return msgspec.structs.replace(cfg, forwarder=msgspec.structs.replace(cfg.forwarder, ack_wait_s=2.0))


async def mark(bus: Bus, stack, node_id: str, state: str) -> None:
    """The membership transition, as the scheduler records it."""
    pool = await membership.load(bus, stack.cfg.nodes, stack.cfg.node_credentials)
    await bus.publish(membership.transition(pool.get(node_id), node_id, state, "test"))


async def test_a_lost_ack_on_a_node_marked_down_is_settled_as_delivered_not_handed_back(tmp_path):
    a, b = (new_orthanc_node(i, tmp_path / "nodes") for i in (1, 2))
    async with standing_in_for_the_scheduler(
        tmp_path, [a, b], 2, seed=1301, services=("ingest",), configure=short_ack_wait
    ) as (stack, bus, received):
        (seq1, r1), (seq2, r2) = received
        delivered, never_sent = placed_from(r1, seq1, "node1"), placed_from(r2, seq2, "node1")
        await bus.publish(delivered)
        await bus.publish(never_sent)

        # A first forwarder takes both (delivery 1), stores the first on node1 over the real
        # wire, and dies before recording or acking anything.
        fcfg = stack.cfg.forwarder
        psub = await bus.pull(forwarder_consumer("node1", fcfg.max_deliver, fcfg.ack_wait_s))
        msgs = await psub.fetch(2, timeout=10)
        assert sorted(ev.decode(m.data).event_id for m in msgs) == sorted([delivered.event_id, never_sent.event_id])
        sender = NodeSender(a.node, fcfg.ae_title, 5.0)
        path = open_blob_store(stack.cfg.blobs).local_path(delivered.blob_key)
        assert path is not None  # the stack's blob store is local
        assert (
            await sender.send(path, delivered.sop_class_uid, delivered.sop_instance_uid, delivered.transfer_syntax_uid)
        ).ok
        await sender.close()
        await psub.unsubscribe()

        # node1 goes down (stopped, and the log says so), then a forwarder starts.
        a.stop()
        await mark(bus, stack, "node1", "down")
        stack.start("forwarder")

        # Both come back redelivered; node1 cannot be asked whether it holds them: held,
        # neither assumed absent (handed back) nor delivered.
        wait_for(
            lambda: stack.metric("forwarder", "switchyard_forwarder_held", 'node="node1"') == 2,
            timeout=30,
            what="both placements held while node1 cannot be asked",
        )
        events = await log_events(stack)
        assert not [e for e in events if isinstance(e, ev.InstanceDeadLetteredV1 | ev.InstanceForwardedV1)]

        # node1 answers again (still marked down): the stored one is settled as delivered
        # there, the other handed back without using up an attempt.
        a.start()

        async def settled():
            got = await log_events(stack)
            done = [e for e in got if isinstance(e, ev.InstanceDeadLetteredV1 | ev.InstanceForwardedV1)]
            return got if len(done) == 2 else None

        events = await poll(settled, timeout=30, what="both placements settled")
        forwarded = [e for e in events if isinstance(e, ev.InstanceForwardedV1)]
        dead = [e for e in events if isinstance(e, ev.InstanceDeadLetteredV1)]
        assert [(f.placement_id, f.node_id, f.already_present) for f in forwarded] == [
            (delivered.event_id, "node1", True)
        ]
        assert [(d.placement_id, d.reason, d.counts_as_attempt) for d in dead] == [
            (never_sent.event_id, ev.FailureReason.NODE_DOWN, False)
        ]
        assert stack.metric("forwarder", "switchyard_forwarder_held", 'node="node1"') == 0
        # Exactly one copy: the one node1 got on the first delivery, none elsewhere.
        assert a.client.sop_instance_uids() == {delivered.sop_instance_uid}
        assert b.client.sop_instance_uids() == set()


async def test_a_node_marked_down_gets_its_idle_associations_closed(tmp_path):
    """Orthanc waits for open associations on SIGTERM: the forwarder must not keep one to a down node."""
    a = new_orthanc_node(1, tmp_path / "nodes")
    async with standing_in_for_the_scheduler(tmp_path, [a], 1, seed=1302) as (stack, bus, received):
        ((seq, r),) = received
        await bus.publish(placed_from(r, seq, "node1"))
        wait_for(lambda: a.client.sop_instance_uids() == {r.sop_instance_uid}, timeout=30, what="delivered")
        # The forwarder keeps the association for the next instance; the node goes down.
        await mark(bus, stack, "node1", "down")
        wait_for(lambda: "node node1: down" in stack.log("forwarder"), timeout=10, what="forwarder saw node1 down")
        started = time.monotonic()
        a.stop()
        took = time.monotonic() - started
        assert took < 5.0, f"Orthanc took {took:.1f}s to stop: an association was still open"
