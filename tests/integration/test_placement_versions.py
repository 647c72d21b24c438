"""Versions: the same SOP Instance UID re-sent with other content goes where its first copy is."""

from __future__ import annotations

import contextlib

import pydicom
import pytest

from shared import events as ev
from shared.dicomfile import dataset_bytes_digest
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack, new_orthanc_node
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import log_events, scheduler_sees

pytestmark = pytest.mark.integration


async def test_a_new_version_follows_its_first_copy_and_is_counted(tmp_path):
    # Two nodes of its own that keep the newest copy of an instance (Orthanc's OverwriteInstances).
    nodes = [new_orthanc_node(i, tmp_path / "orthanc", overrides={"OverwriteInstances": True}) for i in (1, 2)]
    with contextlib.ExitStack() as running:
        for n in nodes:
            running.callback(n.stop)
            n.start()
        await _new_version_follows_first_copy(nodes, tmp_path)


async def _new_version_follows_first_copy(nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", nodes)
    try:
        wait_for(lambda: all(scheduler_sees(stack, n.node.id, True) for n in nodes), timeout=30, what="every node live")
        files = sorted(
            generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=4901)
        )
        assert stack.send(files).returncode == 0
        ds = pydicom.dcmread(files[0])
        sop = str(ds.SOPInstanceUID)

        async def verified(digest: str):
            found = [
                e
                for e in await log_events(stack, ev.InstanceVerifiedV1)
                if e.sop_instance_uid == sop and e.dataset_digest == digest
            ]
            return found or None

        (first,) = await poll(
            lambda: verified(dataset_bytes_digest(files[0].read_bytes())), timeout=60, what="first version verified"
        )
        ds.StudyDescription = "corrected"  # other content, same SOP Instance UID
        changed = tmp_path / "v2.dcm"
        ds.save_as(changed)
        v2_digest = dataset_bytes_digest(changed.read_bytes())
        assert stack.send([changed]).returncode == 0
        (second,) = await poll(lambda: verified(v2_digest), timeout=60, what="second version verified")

        events = await log_events(stack)
        placed = [e for e in events if isinstance(e, ev.InstancePlacedV1) and e.sop_instance_uid == sop]
        assert [(p.reason, p.attempt) for p in placed][1:] == [("new_version", 0)], placed
        assert placed[1].node_id == placed[0].node_id == first.node_id == second.node_id
        assert not [
            e
            for e in events
            if isinstance(e, (ev.InstanceVerificationFailedV1, ev.InstanceDeadLetteredV1)) and e.sop_instance_uid == sop
        ]
        # On its node only, and the node holds the new version.
        holder = next(n for n in nodes if n.node.id == first.node_id)
        other = next(n for n in nodes if n is not holder)
        assert dataset_bytes_digest(holder.client.instance_file(sop)) == v2_digest
        assert other.client.instance_id(sop) is None
        # The catalog keeps the latest and counts the versions; the trail shows both received events.
        trail = wait_for(
            lambda: (t := stack.catalog(f"/api/instances/{sop}/trail"))["instance"]["versions"] == 2 and t,
            timeout=20,
            what="catalog counts two versions",
        )
        assert sum(e["type"].startswith("instance.received.") for e in trail["events"]) == 2
        (row,) = [
            r
            for r in stack.catalog(f"/api/instances?study_uid={ds.StudyInstanceUID}&limit=100")
            if r["sop_instance_uid"] == sop
        ]
        assert row["node_id"] == holder.node.id
    finally:
        stack.close()
