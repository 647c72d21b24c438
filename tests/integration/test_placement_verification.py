"""A delivery the probe cannot verify is a failed delivery: placed again on another node of its pool."""

from __future__ import annotations

import msgspec
import pydicom
import pytest

from shared import events as ev
from shared.config import RoutingConfig, RoutingRule
from shared.dicomfile import dataset_bytes_digest
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import log_events, scheduler_sees, study_rows

pytestmark = pytest.mark.integration

# node3 is live the whole time but outside the pool: it must never get the instance.
PAIR = RoutingConfig(pools={"pair": ["node1", "node2"]}, rules=[RoutingRule(name="pair", pools=["pair"])])


def of(kind, events, sop_uid):
    return [e for e in events if isinstance(e, kind) and e.sop_instance_uid == sop_uid]


async def test_a_failed_verification_is_placed_again_on_another_node_of_the_pool(live_nodes, tmp_path):
    stack = make_stack(
        tmp_path / "stack",
        live_nodes,
        services=("ingest", "scheduler", "probe", "catalog"),
        configure=lambda cfg: msgspec.structs.replace(cfg, routing=PAIR),
    )
    uploaded = None
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        files = sorted(
            generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=4801)
        )
        tampered_file = files[0]
        ds = pydicom.dcmread(tampered_file)
        sop, study_uid = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
        assert stack.send(files).returncode == 0

        # No forwarder yet: the placements wait in their nodes' consumers.
        async def placed_once():
            return of(ev.InstancePlacedV1, await log_events(stack), sop)

        (first,) = await poll(placed_once, timeout=30, what="tampered instance placed")
        bad = next(n for n in live_nodes if n.node.id == first.node_id)
        other = next(n for n in live_nodes if n.node.id in {"node1", "node2"} - {first.node_id})
        # The node already holds a different dataset under this SOP Instance UID (Orthanc keeps
        # the first it got): the C-STORE succeeds, the bytes on the node are not ours.
        ds.StudyDescription = "changed on the node"
        altered = tmp_path / "altered.dcm"
        ds.save_as(altered)
        uploaded = (bad, bad.client.post_json("/instances", altered.read_bytes())["ID"])
        stack.start("forwarder")

        async def replaced_and_verified():
            events = await log_events(stack)
            done = [e for e in of(ev.InstanceVerifiedV1, events, sop) if e.node_id == other.node.id]
            return events if done else None

        events = await poll(replaced_and_verified, timeout=90, what="re-placed instance verified")
        (failed,) = of(ev.InstanceVerificationFailedV1, events, sop)
        # Compared as datasets: the first differing tag is named (never its value).
        assert (failed.node_id, failed.placement_id, failed.reason) == (
            bad.node.id,
            first.event_id,
            "dataset differs at (0008,1030)",
        )
        assert failed.verification_failures == 0
        # The failure carries the placement's fields, filled by the probe.
        assert (failed.received_seq, failed.attempt, failed.pool) == (first.received_seq, 0, "pair")
        placed = of(ev.InstancePlacedV1, events, sop)
        assert [p.attempt for p in placed] == [0, 1]
        again = placed[1]
        assert again.node_id == other.node.id and again.reason == "replacement" and again.pool == "pair"
        assert again.replaces == first.event_id and again.avoid == [bad.node.id]
        assert again.verification_failures == 1
        assert again.event_id == ev.fact_id("placed", sop, first.received_seq, 1, "pair")
        assert {c.node_id for c in again.candidates} == {other.node.id}
        (verified,) = [e for e in of(ev.InstanceVerifiedV1, events, sop) if e.node_id == other.node.id]
        assert verified.dataset_digest == dataset_bytes_digest(tampered_file.read_bytes())
        assert verified.placement_id == again.event_id
        # Really on the other node, byte for byte the dataset we received; never outside the pool.
        assert dataset_bytes_digest(other.client.instance_file(sop)) == verified.dataset_digest
        node3 = next(n for n in live_nodes if n.node.id == "node3")
        assert all(
            node3.client.instance_id(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)) is None
            for f in files
        )
        # The catalog's location follows the re-placement.
        rows = wait_for(
            lambda: [
                r for r in study_rows(stack, study_uid) if r["sop_instance_uid"] == sop and r["state"] == "verified"
            ],
            timeout=20,
            what="catalog shows the new location verified",
        )
        assert [(r["node_id"], r["pool"]) for r in rows] == [(other.node.id, "pair")]
    finally:
        stack.close()
        if uploaded is not None:
            node, orthanc_id = uploaded
            node.client._request(f"/instances/{orthanc_id}", method="DELETE")


async def test_a_verification_failure_on_a_second_node_is_a_final_dead_letter(live_nodes, tmp_path):
    """The same instance fails verification on two nodes: an instance problem, for an operator, no third try."""
    stack = make_stack(tmp_path / "stack", live_nodes, services=("ingest", "scheduler", "probe", "catalog"))
    uploaded = []
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        (path,) = generate_studies(
            tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=1, seed=4802
        )
        ds = pydicom.dcmread(path)
        sop = str(ds.SOPInstanceUID)
        # Every node already holds another dataset under this SOP Instance UID: each delivery
        # "succeeds" and each node keeps the wrong one.
        ds.StudyDescription = "changed on the node"
        altered = tmp_path / "altered.dcm"
        ds.save_as(altered)
        for n in live_nodes:
            uploaded.append((n, n.client.post_json("/instances", altered.read_bytes())["ID"]))
        assert stack.send([path]).returncode == 0
        stack.start("forwarder")

        async def dead():
            events = await log_events(stack)
            return events if of(ev.InstanceDeadLetteredV1, events, sop) else None

        events = await poll(dead, timeout=90, what="final dead letter")
        failures = of(ev.InstanceVerificationFailedV1, events, sop)
        assert [f.verification_failures for f in failures] == [0, 1]
        assert len({f.node_id for f in failures}) == 2
        (letter,) = of(ev.InstanceDeadLetteredV1, events, sop)
        assert letter.final and letter.placement_id == failures[1].placement_id
        assert "verification failed on 2 nodes" in letter.reason and "changed" not in letter.reason
        # Settled: no third placement, however long we look (the scheduler acked the failure).
        assert [p.attempt for p in of(ev.InstancePlacedV1, events, sop)] == [0, 1]
        wait_for(
            lambda: stack.metric("scheduler", "switchyard_scheduler_final_dead_letters_total") == 1,
            timeout=10,
            what="final dead letter counted",
        )
        assert [p.attempt for p in of(ev.InstancePlacedV1, await log_events(stack), sop)] == [0, 1]
    finally:
        stack.close()
        for node, orthanc_id in uploaded:
            node.client._request(f"/instances/{orthanc_id}", method="DELETE")
