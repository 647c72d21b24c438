"""Poison never blocks the queue: an instance its nodes reject is dead-lettered within two
tries and a few seconds, and good instances sent at the same time are delivered as fast
(within 2 s) as without it.

The poison is a node-level rejection by real Orthanc nodes: they accept only little endian
transfer syntaxes, and the poison arrives (and is kept, byte for byte) as Explicit VR Big
Endian, which ingest accepts and no node will take.
"""

from __future__ import annotations

import asyncio
import statistics

import pydicom
import pytest

from shared import events as ev
from switchyard.corpus import generate_studies
from tests.factories import placed_from
from tests.fixtures.servers import log_events, make_stack, new_orthanc_node
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import by_study, standing_in_for_the_scheduler

pytestmark = pytest.mark.integration

LITTLE_ENDIAN_ONLY = {"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]}
GOOD = 24
POISON = 2


def delays(events: list, sops: set[str]) -> list[float]:
    """Seconds from ``received`` to ``forwarded``, per instance of ``sops``."""
    received = {e.sop_instance_uid: e.occurred_at for e in events if isinstance(e, ev.InstanceReceivedV1)}
    return [
        (e.occurred_at - received[e.sop_instance_uid]).total_seconds()
        for e in events
        if isinstance(e, ev.InstanceForwardedV1) and e.sop_instance_uid in sops
    ]


async def forwarded_all(stack, sops: set[str]) -> list:
    async def done():
        events = await log_events(stack)
        got = {e.sop_instance_uid for e in events if isinstance(e, ev.InstanceForwardedV1)}
        return events if sops <= got else None

    return await poll(done, timeout=60, interval=0.2, what="good instances forwarded")


async def test_a_poison_instance_is_dead_lettered_fast_and_does_not_delay_good_ones(tmp_path):
    nodes = [new_orthanc_node(i, tmp_path / "nodes", LITTLE_ENDIAN_ONLY) for i in (1, 2)]
    stack = None
    try:
        for n in nodes:
            n.start()
        stack = make_stack(tmp_path / "stack", nodes)
        studies = by_study(
            generate_studies(tmp_path / "corpus", studies=3, series_per_study=1, instances_per_series=GOOD, seed=1401)
        )
        base, good, poison = (files for _uid, files in sorted(studies.items()))
        poison = poison[:POISON]
        wait_for(
            lambda: all(
                stack.metric("scheduler", "switchyard_scheduler_node_live", f'node="{n.node.id}"') == 1 for n in nodes
            ),
            timeout=30,
            what="both nodes live",
        )

        # Baseline: good instances alone.
        assert stack.send(base).returncode == 0
        events = await forwarded_all(stack, _sops(base))
        baseline = delays(events, _sops(base))

        # The same again, with the poison sent at the same time.
        sent = await asyncio.gather(
            asyncio.to_thread(stack.send, good), asyncio.to_thread(stack.send, poison, "POISONSCU", ["-xb"])
        )
        assert [s.returncode for s in sent] == [0, 0]
        events = await forwarded_all(stack, _sops(good))
        with_poison = delays(events, _sops(good))

        # The poison: refused by each node at once, dead-lettered on both, never stored.
        poison_sops = _sops(poison)

        async def dead_for_good():
            got = await log_events(stack)
            dead = [e for e in got if isinstance(e, ev.InstanceDeadLetteredV1) and e.sop_instance_uid in poison_sops]
            return got if len(dead) == 2 * POISON else None

        events = await poll(dead_for_good, timeout=30, interval=0.2, what="poison dead-lettered on both nodes")
        received = {e.sop_instance_uid: e.occurred_at for e in events if isinstance(e, ev.InstanceReceivedV1)}
        for sop in poison_sops:
            dead = [e for e in events if isinstance(e, ev.InstanceDeadLetteredV1) and e.sop_instance_uid == sop]
            failed = [e for e in events if isinstance(e, ev.InstanceForwardFailedV1) and e.sop_instance_uid == sop]
            assert sorted(d.node_id for d in dead) == ["node1", "node2"]
            for d in dead:
                tries = [f for f in failed if f.placement_id == d.placement_id]
                assert 1 <= len(tries) <= 2 and not any(f.node_failure for f in tries)
            settle = max((d.occurred_at - received[sop]).total_seconds() for d in dead)
            print(f"poison dead-lettered on both nodes {settle:.3f}s after it was received")
            assert settle < 10.0, f"poison dead-lettered after {settle:.1f}s"
        assert not [e for e in events if isinstance(e, ev.InstanceForwardedV1) and e.sop_instance_uid in poison_sops]
        for n in nodes:
            assert not poison_sops & n.client.sop_instance_uids()

        added = statistics.mean(with_poison) - statistics.mean(baseline)
        worst = max(with_poison) - max(baseline)
        print(
            f"good delivery delay: baseline mean {statistics.mean(baseline):.3f}s max {max(baseline):.3f}s; "
            f"with poison mean {statistics.mean(with_poison):.3f}s max {max(with_poison):.3f}s"
        )
        assert added < 2.0 and worst < 2.0, (baseline, with_poison)
    finally:
        if stack is not None:
            stack.close()
        for n in nodes:
            n.stop()


def _sops(files) -> set[str]:
    return {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


async def test_a_failing_node_pauses_its_worker_and_uses_up_no_delivery(tmp_path):
    """Connection refused is the node's failure, not the instance's: no delivery burnt, no dead letter."""
    a = new_orthanc_node(1, tmp_path / "nodes")
    async with standing_in_for_the_scheduler(tmp_path, [a], 1, seed=1402) as (stack, bus, received):
        ((seq, r),) = received
        a.stop()
        await bus.publish(placed_from(r, seq, "node1"))
        # Three pauses (0.5 + 1 + 2 s): with per-message retries (max_deliver 4, backoff
        # 0.2/0.5/1 s) the placement would have been dead-lettered by then.
        wait_for(
            lambda: (stack.metric("forwarder", "switchyard_forwarder_node_failures_total", 'node="node1"') or 0) >= 3,
            timeout=30,
            what="three node failures",
        )
        a.start()
        wait_for(lambda: a.client.sop_instance_uids() == {r.sop_instance_uid}, timeout=30, what="delivered")

        async def forwarded():
            got = await log_events(stack)
            return got if any(isinstance(e, ev.InstanceForwardedV1) for e in got) else None

        events = await poll(forwarded, timeout=30, what="forwarded recorded")
        failed = [e for e in events if isinstance(e, ev.InstanceForwardFailedV1)]
        # One node-failure witness, on the first (and only) delivery.
        assert [(f.delivery, f.node_failure, f.permanent) for f in failed] == [(1, True, False)]
        assert not [e for e in events if isinstance(e, ev.InstanceDeadLetteredV1)]
