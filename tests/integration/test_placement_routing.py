"""Routing rules, pools and fan-out on real servers: where instances land in the real Orthancs."""

from __future__ import annotations

import msgspec
import pydicom
import pytest

from shared import events as ev
from shared.config import RoutingConfig, RoutingRule
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for
from tests.integration.placement_helpers import by_study, log_events, nodes_cli, scheduler_sees, study_rows

pytestmark = pytest.mark.integration

DELIVERED = ("forwarded", "verified")

# node2 takes MR only; everything else goes to node1/node3; research senders' instances
# also get a copy on node2 (fan-out: one placement per pool).
ROUTING = RoutingConfig(
    pools={"mr": ["node2"], "general": ["node1", "node3"], "research": ["node2"]},
    rules=[
        RoutingRule(name="research", pools=["general", "research"], match={"calling_ae": "RESEARCH_*"}),
        RoutingRule(name="mr", pools=["mr"], match={"modality": "MR"}),
        RoutingRule(name="rest", pools=["general"]),
    ],
)


@pytest.fixture(scope="module")
def routed(orthanc_nodes, tmp_path_factory):
    for n in orthanc_nodes:
        if not n.running:
            n.start()
    stack = make_stack(
        tmp_path_factory.mktemp("routed"),
        orthanc_nodes,
        configure=lambda cfg: msgspec.structs.replace(cfg, routing=ROUTING),
    )
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in orthanc_nodes),
            timeout=30,
            what="every node live",
        )
        yield stack
    finally:
        stack.close()


def modality(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).Modality)


def sop(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def held_by(nodes, sop_uid: str) -> set[str]:
    """The nodes whose Orthanc really holds the instance."""
    return {n.node.id for n in nodes if n.client.instance_id(sop_uid) is not None}


def delivered(stack, studies: dict, per_instance: int = 1) -> dict[str, list[dict]] | None:
    """Catalog rows per study once each instance has ``per_instance`` delivered locations."""
    out = {}
    for study_uid, files in studies.items():
        rows = study_rows(stack, study_uid)
        if len(rows) != len(files) * per_instance or any(r["state"] not in DELIVERED for r in rows):
            return None
        out[study_uid] = rows
    return out


async def placements(stack, sops: set[str]) -> list[ev.InstancePlacedV1]:
    return [e for e in await log_events(stack) if isinstance(e, ev.InstancePlacedV1) and e.sop_instance_uid in sops]


async def test_rule_by_modality_sends_mr_to_its_pool_and_the_rest_elsewhere(routed, live_nodes, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=6, series_per_study=1, instances_per_series=2, seed=4701)
    studies = by_study(files)
    for study_files in studies.values():
        assert routed.send(study_files).returncode == 0
    wait_for(lambda: delivered(routed, studies), timeout=60, what="every instance delivered")

    mr = {sop(f) for f in files if modality(f) == "MR"}
    ct = {sop(f) for f in files if modality(f) == "CT"}
    assert len(mr) == 6 and len(ct) == 6
    for uid in mr:
        assert held_by(live_nodes, uid) == {"node2"}, uid
    general = set()
    for uid in ct:
        (node,) = held_by(live_nodes, uid)
        assert node in {"node1", "node3"}
        general.add(node)
    placed = await placements(routed, mr | ct)
    assert len(placed) == 12 and all(e.reason == "rule" for e in placed)
    assert {(e.rule, e.pool) for e in placed if e.sop_instance_uid in mr} == {("mr", "mr")}
    assert {(e.rule, e.pool) for e in placed if e.sop_instance_uid in ct} == {("rest", "general")}
    # Only the pool's nodes were candidates.
    assert all({c.node_id for c in e.candidates} == {"node2"} for e in placed if e.sop_instance_uid in mr)
    assert all({c.node_id for c in e.candidates} == {"node1", "node3"} for e in placed if e.sop_instance_uid in ct)
    print(f"CT studies on {sorted(general)}")


async def test_a_pool_without_an_eligible_node_waits_and_never_goes_elsewhere(routed, live_nodes, tmp_path):
    assert nodes_cli(routed, "drain", "node2").returncode == 0
    wait_for(lambda: scheduler_sees(routed, "node2", False), timeout=30, what="node2 drained")
    waited_before = routed.metric("scheduler", "switchyard_scheduler_no_live_node_total") or 0
    files = [
        f
        for f in generate_studies(tmp_path / "corpus", studies=2, series_per_study=1, instances_per_series=2, seed=4702)
        if modality(f) == "MR"
    ]
    assert len(files) == 2
    assert routed.send(files).returncode == 0
    sops = {sop(f) for f in files}
    # Retried for want of a node in pool "mr" (node1 and node3 are live, but not in it).
    wait_for(
        lambda: (routed.metric("scheduler", "switchyard_scheduler_no_live_node_total") or 0) >= waited_before + 2,
        timeout=30,
        what="the MR instances waiting for their pool",
    )
    assert await placements(routed, sops) == []
    assert all(held_by(live_nodes, uid) == set() for uid in sops)

    assert nodes_cli(routed, "undrain", "node2").returncode == 0
    (study_uid,) = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    wait_for(lambda: delivered(routed, {study_uid: files}), timeout=60, what="MR delivered after undrain")
    assert all(held_by(live_nodes, uid) == {"node2"} for uid in sops)
    assert {e.node_id for e in await placements(routed, sops)} == {"node2"}


async def test_fan_out_puts_the_instance_on_a_node_of_each_pool(routed, live_nodes, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=3, seed=4703)
    studies = by_study(files)
    ((study_uid, _),) = studies.items()
    assert routed.send(files, calling_ae="RESEARCH_7").returncode == 0
    final = wait_for(
        lambda: delivered(routed, studies, per_instance=2), timeout=60, what="every instance delivered to both pools"
    )

    sops = {sop(f) for f in files}
    rows = final[study_uid]
    for uid in sops:
        mine = {r["pool"]: r["node_id"] for r in rows if r["sop_instance_uid"] == uid}
        assert set(mine) == {"general", "research"}
        assert mine["research"] == "node2" and mine["general"] in {"node1", "node3"}
        # Really there, on both nodes.
        assert held_by(live_nodes, uid) == {"node2", mine["general"]}
    # The study stays together inside each pool.
    assert len({r["node_id"] for r in rows if r["pool"] == "general"}) == 1
    placed = await placements(routed, sops)
    assert len(placed) == 6 and len({e.event_id for e in placed}) == 6
    assert all(e.rule == "research" and e.reason == "rule" for e in placed)
    for e in placed:
        assert e.event_id == ev.fact_id("placed", e.sop_instance_uid, e.received_seq, 0, e.pool)
    # The audit trail says which rule and pool each placement came from.
    trail = routed.catalog(f"/api/instances/{sorted(sops)[0]}/trail")["events"]
    assert sorted((t["why"]["rule"], t["why"]["pool"]) for t in trail if t["type"] == "instance.placed.v1") == [
        ("research", "general"),
        ("research", "research"),
    ]
    # One instance in the catalog per SOP, two locations each.
    totals = routed.catalog(f"/api/studies?study_uid={study_uid}")
    assert totals[0]["instances"] == 3 and totals[0]["delivered"] == 6
