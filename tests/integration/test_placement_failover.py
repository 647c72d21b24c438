"""A node killed mid-stream: its remaining and in-flight work lands elsewhere, nothing lost, nothing twice."""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter

import pytest

from shared import events as ev
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import all_forwarded, by_study, log_events, scheduler_sees

pytestmark = pytest.mark.integration


async def test_killed_node_work_moves_whole_and_restarted_node_gets_new_studies(live_nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", live_nodes)
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        studies = by_study(
            generate_studies(tmp_path / "corpus", studies=6, series_per_study=1, instances_per_series=8, seed=4101)
        )
        first = {s: sorted(f)[:3] for s, f in studies.items()}
        rest = {s: sorted(f)[3:] for s, f in studies.items()}
        for files in first.values():
            assert stack.send(files).returncode == 0
        rows = wait_for(lambda: all_forwarded(stack, first), timeout=60, what="first part forwarded")
        node_of = {s: r[0]["node_id"] for s, r in rows.items()}
        victim_id = Counter(node_of.values()).most_common(1)[0][0]
        victim = next(n for n in live_nodes if n.node.id == victim_id)
        moved = {s for s, n in node_of.items() if n == victim_id}

        # The rest of every study, one association per study, while the victim dies (SIGKILL).
        results: list[int] = []
        sender = threading.Thread(
            target=lambda: results.extend(
                stack.send(files, calling_ae=f"SCU{i}").returncode for i, files in enumerate(rest.values())
            )
        )
        sender.start()
        killed_at = ev.utcnow()
        victim.proc.kill()
        victim.proc = None
        sender.join(120)
        assert results == [0] * len(rest), "every instance acknowledged by ingest"

        final = wait_for(lambda: all_forwarded(stack, studies), timeout=120, what="every instance forwarded")
        # Nothing twice in the catalog: one row per instance.
        totals = stack.catalog("/api/totals")
        assert totals["instances"] == sum(len(f) for f in studies.values())

        events = await log_events(stack)
        placed_by_sop = Counter(e.sop_instance_uid for e in events if isinstance(e, ev.InstancePlacedV1))
        rows_by_sop = {r["sop_instance_uid"]: r for rows in final.values() for r in rows}
        # The studies the victim held moved together: their later instances sit on one live node.
        for study_uid in moved:
            later_nodes = {r["node_id"] for r in final[study_uid] if r["node_id"] != victim_id}
            assert len(later_nodes) == 1, (study_uid, later_nodes)
        assert any(
            isinstance(e, ev.InstancePlacedV1) and e.reason == "failover" and e.study_moved_from == victim_id
            for e in events
        ), "a placement says the study moved off the dead node"
        downs = [
            e
            for e in events
            if isinstance(e, ev.NodeStateChangedV1)
            and e.node_id == victim_id
            and e.state == "down"
            and e.occurred_at >= killed_at
        ]
        # One event for the transition, however many scheduler checks saw it.
        assert len(downs) == 1, downs
        # Everything the catalog says is forwarded is really on that node (the victim's after restart).
        for n in live_nodes:
            if n is not victim:
                held = n.client.sop_instance_uids()
                assert {s for s, r in rows_by_sop.items() if r["node_id"] == n.node.id} <= held
        # Re-placement is bounded (scheduler.max_attempts counted placements per instance; hand-backs of a
        # node that went down are not counted, up to 4x).
        assert max(placed_by_sop.values()) <= 4 * stack.cfg.scheduler.max_attempts
        replaced = [e for e in events if isinstance(e, ev.InstancePlacedV1) and e.attempt > 0]
        print(
            f"re-placed after the kill: {len(replaced)}; failover placements: "
            f"{sum(isinstance(e, ev.InstancePlacedV1) and e.reason == 'failover' for e in events)}"
        )

        victim.start()
        wait_for(lambda: scheduler_sees(stack, victim_id, True), timeout=30, what="restarted node live")
        assert {s for s, r in rows_by_sop.items() if r["node_id"] == victim_id} <= victim.client.sop_instance_uids()
        # Eligible again: every new placement lists it among the candidates; and, placement
        # being load-aware (its RTT may still be worse), it gets new studies within a few batches.
        got_work = False
        for batch in range(4):
            fresh = by_study(
                generate_studies(
                    tmp_path / f"fresh{batch}", studies=9, series_per_study=1, instances_per_series=2, seed=4102 + batch
                )
            )
            for files in fresh.values():
                assert stack.send(files).returncode == 0
            rows = wait_for(functools.partial(all_forwarded, stack, fresh), timeout=60, what="new studies forwarded")
            placed = [
                e
                for e in await log_events(stack)
                if isinstance(e, ev.InstancePlacedV1) and e.study_instance_uid in fresh
            ]
            assert placed and all(victim_id in {c.node_id for c in e.candidates} for e in placed)
            if victim_id in {r[0]["node_id"] for r in rows.values()}:
                got_work = True
                break
        assert got_work, "the restarted node gets new studies"
        ups = [
            e
            for e in await log_events(stack)
            if isinstance(e, ev.NodeStateChangedV1)
            and e.node_id == victim_id
            and e.state == "up"
            and e.occurred_at >= killed_at
        ]
        assert len(ups) == 1
    finally:
        stack.close()


async def test_backlog_of_a_dead_node_is_placed_again_elsewhere(live_nodes, tmp_path):
    """Work already placed on a node that dies before delivery: handed back, re-placed, delivered."""
    stack = make_stack(tmp_path / "stack", live_nodes, services=("ingest", "scheduler", "probe", "catalog"))
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        studies = by_study(
            generate_studies(tmp_path / "corpus", studies=3, series_per_study=1, instances_per_series=4, seed=4201)
        )
        for files in studies.values():
            assert stack.send(files).returncode == 0

        # No forwarder yet: every instance waits as placed work in its node's consumer.
        async def all_placed():
            placed = [e for e in await log_events(stack) if isinstance(e, ev.InstancePlacedV1)]
            return placed if len(placed) == 12 else None

        placed = await poll(all_placed, timeout=30, what="every instance placed")
        victim_id = placed[0].node_id
        victim = next(n for n in live_nodes if n.node.id == victim_id)
        stranded = {e.sop_instance_uid for e in placed if e.node_id == victim_id}
        victim.proc.kill()
        victim.proc = None
        wait_for(lambda: scheduler_sees(stack, victim_id, False), timeout=30, what="victim down")

        async def down_event():
            return any(
                isinstance(e, ev.NodeStateChangedV1) and e.node_id == victim_id and e.state == "down"
                for e in await log_events(stack)
            )

        await poll(down_event, timeout=10, what="down event")
        stack.start("forwarder")

        final = wait_for(lambda: all_forwarded(stack, studies), timeout=90, what="every instance forwarded")
        rows = {r["sop_instance_uid"]: r for rs in final.values() for r in rs}
        assert all(rows[s]["node_id"] != victim_id for s in stranded)
        events = await log_events(stack)
        handed_back = {
            e.sop_instance_uid
            for e in events
            if isinstance(e, ev.InstanceDeadLetteredV1) and e.node_id == victim_id and e.reason == "node down"
        }
        assert handed_back == stranded
        letters = {e.placement_id: e for e in events if isinstance(e, ev.InstanceDeadLetteredV1)}
        again = [
            e for e in events if isinstance(e, ev.InstancePlacedV1) and e.sop_instance_uid in stranded and e.replaces
        ]
        assert {e.sop_instance_uid for e in again} == stranded
        assert all(e.reason == "failover" for e in again)
        # A hand-back the forwarder says used up no attempt is counted as a hand-back, not an attempt.
        for e in again:
            counted = letters[e.replaces].counts_as_attempt
            assert e.attempt == 1 and e.handbacks == (0 if counted else 1), (e.attempt, e.handbacks, counted)
        # The stranded study moved whole: one new node per study.
        for study_uid, rs in final.items():
            assert len({r["node_id"] for r in rs}) == 1, study_uid
        for n in live_nodes:
            if n is not victim:
                assert {s for s, r in rows.items() if r["node_id"] == n.node.id} <= n.client.sop_instance_uids()
    finally:
        stack.close()


async def test_a_killed_probe_marks_no_node_down_and_routing_continues(live_nodes, tmp_path):
    """Liveness has more than one witness: the probe's silence is not the nodes' failure."""
    stack = make_stack(tmp_path / "stack", live_nodes)
    timeout = stack.cfg.scheduler.heartbeat_timeout_s
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        assert stack.metric("scheduler", "switchyard_scheduler_probe_lost") == 0
        before = by_study(
            generate_studies(tmp_path / "before", studies=3, series_per_study=1, instances_per_series=3, seed=4301)
        )
        for files in before.values():
            assert stack.send(files).returncode == 0
        wait_for(lambda: all_forwarded(stack, before), timeout=60, what="first studies forwarded")

        killed_at = ev.utcnow()
        stack.services.pop("probe").kill()  # SIGKILL: no goodbye heartbeat
        lost_seen = time.monotonic()
        wait_for(
            lambda: stack.metric("scheduler", "switchyard_scheduler_probe_lost") == 1,
            timeout=5 * timeout,
            what="probe lost raised",
        )
        assert "probe lost" in stack.log("scheduler")
        # Routing continues while the probe is gone: new studies are placed and forwarded.
        during = by_study(
            generate_studies(tmp_path / "during", studies=3, series_per_study=1, instances_per_series=3, seed=4302)
        )
        for files in during.values():
            assert stack.send(files).returncode == 0
        wait_for(lambda: all_forwarded(stack, during), timeout=60, what="studies forwarded without a probe")
        # Observed for at least 2x the heartbeat timeout past the loss: every node stays eligible.
        deadline = max(lost_seen, time.monotonic()) + 2 * timeout
        while time.monotonic() < deadline:
            assert all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), "a node went ineligible"
            time.sleep(0.1)
        events = [e for e in await log_events(stack) if e.occurred_at >= killed_at]
        assert not [e for e in events if isinstance(e, ev.NodeStateChangedV1)], "membership frozen"
        assert not [e for e in events if isinstance(e, ev.InstanceDeadLetteredV1)], "no hand-backs"
        during_sops = {e.sop_instance_uid for e in events if isinstance(e, ev.InstancePlacedV1)}
        assert len(during_sops) == sum(len(f) for f in during.values())

        stack.start("probe")
        wait_for(
            lambda: stack.metric("scheduler", "switchyard_scheduler_probe_lost") == 0, timeout=30, what="probe back"
        )
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes),
            timeout=30,
            what="every node live again",
        )
        events = [e for e in await log_events(stack) if e.occurred_at >= killed_at]
        assert not [e for e in events if isinstance(e, ev.NodeStateChangedV1)], "no node down on the probe's return"

        # A node that really fails still goes down (the probe's own witness).
        victim = live_nodes[1]
        victim.stop()
        wait_for(lambda: scheduler_sees(stack, victim.node.id, False), timeout=30, what="stopped node ineligible")

        async def down():
            return [
                e
                for e in await log_events(stack, ev.NodeStateChangedV1)
                if e.node_id == victim.node.id and e.state == "down" and e.occurred_at >= killed_at
            ]

        (went_down,) = await poll(down, timeout=30, what="down event for the stopped node")
        assert went_down.reason.startswith("probe:"), went_down.reason
        assert stack.metric("scheduler", "switchyard_scheduler_probe_lost") == 0
    finally:
        stack.close()
