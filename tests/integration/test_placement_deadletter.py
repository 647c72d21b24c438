"""Every node refusing an instance's transfer syntax: re-placed a bounded number of times, then dead letters."""

from __future__ import annotations

import pytest

from shared import events as ev
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack, new_orthanc_node
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import by_study, log_events, standing_in_for_the_scheduler, study_rows

pytestmark = pytest.mark.integration

IMPLICIT_ONLY = {"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2"]}


async def test_all_nodes_refusing_the_transfer_syntax_dead_letter(tmp_path):
    nodes = [new_orthanc_node(i, tmp_path / "nodes", IMPLICIT_ONLY) for i in (1, 2)]
    stack = None
    try:
        for n in nodes:
            n.start()
        stack = make_stack(tmp_path / "stack", nodes)
        # Generated files are Explicit VR Little Endian, which these nodes refuse.
        studies = by_study(
            generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=4401)
        )
        ((study_uid, files),) = studies.items()
        assert stack.send(files).returncode == 0

        def final_dead_letters():
            done = stack.metric("scheduler", "switchyard_scheduler_final_dead_letters_total")
            rows = study_rows(stack, study_uid)
            caught_up = len(rows) == len(files) and all(r["state"] == "dead_lettered" for r in rows)
            return rows if done == len(files) and caught_up else None

        # The catalog shows every instance dead-lettered once the scheduler has given up on it.
        rows = wait_for(final_dead_letters, timeout=90, what="dead letters final")
        events = await log_events(stack)
        assert not any(isinstance(e, ev.InstanceForwardedV1) for e in events)
        for row in rows:
            sop = row["sop_instance_uid"]
            dead = [e for e in events if isinstance(e, ev.InstanceDeadLetteredV1) and e.sop_instance_uid == sop]
            placed = [e for e in events if isinstance(e, ev.InstancePlacedV1) and e.sop_instance_uid == sop]
            # Placed on each node once (the second avoids the first), refused permanently by both.
            assert sorted(e.node_id for e in dead) == ["node1", "node2"]
            assert all("transfer syntax" in e.reason for e in dead)
            assert [e.attempt for e in placed] == [0, 1] and placed[1].reason == "replacement"
            assert placed[1].avoid == [placed[0].node_id] and placed[1].replaces == placed[0].event_id
            failed = [e for e in events if isinstance(e, ev.InstanceForwardFailedV1) and e.sop_instance_uid == sop]
            assert failed and all(e.permanent for e in failed)
        for n in nodes:
            assert n.client.sop_instance_uids() == set()
    finally:
        if stack is not None:
            stack.close()
        for n in nodes:
            n.stop()


async def test_a_hand_back_because_the_node_went_down_uses_up_no_attempt(tmp_path):
    """The scheduler places a ``counts_as_attempt=False`` dead letter again even on its last
    attempt (counting it in ``handbacks``), and gives up on an ordinary one."""
    nodes = [new_orthanc_node(i, tmp_path / "nodes") for i in (1, 2)]
    # No forwarder: placements stay placed, and the test records the dead letters as it would.
    async with standing_in_for_the_scheduler(
        tmp_path, nodes, 2, seed=4402, services=("ingest", "scheduler", "probe")
    ) as (stack, bus, received):
        last = stack.cfg.scheduler.max_attempts - 1

        async def first_placements():
            got = [e for e in await log_events(stack) if isinstance(e, ev.InstancePlacedV1)]
            return got if len(got) == 2 else None

        placed = {p.sop_instance_uid: p for p in await poll(first_placements, timeout=30, what="placed")}
        for (seq, r), handed_back in zip(received, (True, False), strict=True):
            p = placed[r.sop_instance_uid]
            await bus.publish(
                ev.InstanceDeadLetteredV1(
                    event_id=ev.fact_id("dead_lettered", p.event_id),
                    sop_instance_uid=p.sop_instance_uid,
                    study_instance_uid=p.study_instance_uid,
                    node_id=p.node_id,
                    placement_id=p.event_id,
                    reason=ev.FailureReason.NODE_DOWN if handed_back else "node refused the instance (0xC000)",
                    received_seq=seq,
                    attempt=last,
                    counts_as_attempt=not handed_back,
                )
            )
        wait_for(
            lambda: stack.metric("scheduler", "switchyard_scheduler_final_dead_letters_total") == 1,
            timeout=30,
            what="the ordinary dead letter given up",
        )

        async def replaced():
            got = [e for e in await log_events(stack) if isinstance(e, ev.InstancePlacedV1) and e.attempt == last + 1]
            return got or None

        again = await poll(replaced, timeout=30, what="the hand-back placed again")
        assert [(p.sop_instance_uid, p.handbacks) for p in again] == [(received[0][1].sop_instance_uid, 1)]
