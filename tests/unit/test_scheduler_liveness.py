"""Liveness witnesses (pure): a node is down on its own failure, not on the probe's silence."""

from __future__ import annotations

from services.scheduler.liveness import Liveness
from shared import events as ev
from shared.config import NodeConfig
from shared.membership import Pool

TIMEOUT = 2.0


def hb(node_id: str, up: bool = True) -> ev.NodeHeartbeatV1:
    return ev.NodeHeartbeatV1(event_id=f"{node_id}-hb", node_id=node_id, up=up, error="" if up else "C-ECHO failed")


def three() -> Liveness:
    live = Liveness(Pool([NodeConfig(id=n) for n in ("n1", "n2", "n3")]), TIMEOUT, 1.0, now=0.0)
    for n in ("n1", "n2", "n3"):
        live.silence_witnessed(n, 0.0)  # the scheduler starts watching
        live.heartbeat(hb(n), 0.5)
    return live


def eligible(live: Liveness, now: float) -> set[str]:
    return {v.node_id for v in live.views(now) if v.eligible}


def test_silence_of_every_node_is_the_probe_lost_and_keeps_them_eligible():
    live = three()
    # Heartbeats stop a little apart (one watch loop per node): no node is witnessed silent.
    live.heartbeat(hb("n1"), 1.0)
    live.heartbeat(hb("n3"), 1.2)
    for now in (3.1, 3.3, 5.0, 60.0):
        assert not any(live.silence_witnessed(n, now) for n in ("n1", "n2", "n3"))
        assert eligible(live, now) == {"n1", "n2", "n3"}
    assert not live.probe_lost(3.0) and live.probe_lost(3.3)


def test_one_silent_node_while_the_others_report_is_witnessed():
    live = three()
    for t in (1.0, 2.0, 3.0):
        live.heartbeat(hb("n1"), t)
        live.heartbeat(hb("n3"), t)
    assert not live.silence_witnessed("n2", 2.4)  # within its deadline (0.5 + 2)
    assert live.silence_witnessed("n2", 3.1) and eligible(live, 3.1) == {"n1", "n3"}
    assert not live.probe_lost(3.1)


def test_a_probe_down_heartbeat_makes_the_node_ineligible_at_once():
    live = three()
    live.heartbeat(hb("n2", up=False), 1.0)
    assert eligible(live, 1.0) == {"n1", "n3"}


def test_after_the_probe_comes_back_the_others_are_not_late():
    live = three()
    assert live.probe_lost(30.0)
    live.heartbeat(hb("n1"), 30.0)  # first heartbeat of the restarted probe
    assert not live.probe_lost(30.1)
    # n2 and n3 get a fresh deadline from the resume, not from their old heartbeats.
    assert not live.silence_witnessed("n2", 31.0) and eligible(live, 31.0) == {"n1", "n2", "n3"}
    for t in (31.0, 32.0, 32.5):
        live.heartbeat(hb("n1"), t)
    assert live.silence_witnessed("n2", 32.5)


def test_a_scheduler_started_while_the_probe_is_dead_keeps_membership():
    live = Liveness(Pool([NodeConfig(id="n1"), NodeConfig(id="n2")]), TIMEOUT, 1.0, now=0.0)
    assert eligible(live, 1.0) == set()  # not yet known either way: placements wait
    assert live.probe_lost(6.1) and eligible(live, 6.1) == {"n1", "n2"}
