"""Verified delivery on real servers: the probe reads forwarded instances back from Orthanc."""

from __future__ import annotations

import asyncio

import pydicom
import pytest

from shared import events as ev
from shared.bus import Bus
from shared.dicomfile import dataset_bytes_digest
from switchyard.corpus import corpus_index, generate_studies
from tests.fixtures.servers import log_events
from tests.fixtures.util import dump_all, poll, wait_for

pytestmark = pytest.mark.integration


async def verified_for(stack, sops: list[str]) -> dict[str, ev.InstanceVerifiedV1]:
    found = {
        e.sop_instance_uid: e for e in await log_events(stack, ev.InstanceVerifiedV1) if e.sop_instance_uid in sops
    }
    return found if len(found) == len(sops) else {}


def sop_of(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


async def test_routed_instances_are_verified_against_the_ingest_digest(stack, live_nodes, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=2, instances_per_series=2, seed=5101)
    ((study_uid, sops),) = corpus_index(files).items()
    assert stack.send([tmp_path / "corpus"], extra=["+sd", "+r"]).returncode == 0

    verified = await poll(lambda: verified_for(stack, sops), timeout=60, what="every instance verified")
    digests = {sop_of(f): dataset_bytes_digest(f.read_bytes()) for f in files}
    forwarded = {
        e.sop_instance_uid: e for e in await log_events(stack, ev.InstanceForwardedV1) if e.sop_instance_uid in sops
    }
    for sop, v in verified.items():
        assert v.dataset_digest == digests[sop]
        assert (v.node_id, v.placement_id) == (forwarded[sop].node_id, forwarded[sop].placement_id)
        assert v.study_instance_uid == study_uid
        assert v.event_id == ev.fact_id("verified", v.node_id, sop, v.placement_id)
    assert not [e for e in await log_events(stack, ev.InstanceVerificationFailedV1) if e.sop_instance_uid in sops]

    # The catalog follows the probe's verdict.
    def verified_in_catalog() -> set[str]:
        return {
            r["sop_instance_uid"]
            for r in stack.catalog(f"/api/instances?study_uid={study_uid}")
            if r["state"] == "verified"
        }

    wait_for(lambda: verified_in_catalog() == set(sops), timeout=20, what="catalog shows every instance verified")
    assert verified_in_catalog() == set(sops)


async def test_an_instance_whose_stored_bytes_differ_fails_verification(stack, live_nodes, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=5102)
    ((study_uid, sops),) = corpus_index(files).items()
    tampered_file, clean_file = sorted(files)
    tampered_sop, clean_sop = sop_of(tampered_file), sop_of(clean_file)
    ds = pydicom.dcmread(tampered_file)
    ds.StudyDescription = "altered before the forwarder got there"
    altered = tmp_path / "altered.dcm"
    ds.save_as(altered)
    assert dataset_bytes_digest(altered.read_bytes()) != dataset_bytes_digest(tampered_file.read_bytes())
    # The nodes keep what they got first (OverwriteInstances false): whichever node the
    # study lands on already holds a different dataset under the same SOP Instance UID.
    uploaded = [n.client.post_json("/instances", altered.read_bytes())["ID"] for n in live_nodes]
    try:
        assert stack.send([tmp_path / "corpus"], extra=["+sd", "+r"]).returncode == 0

        async def outcome():
            events = await log_events(stack)
            failed = [
                e
                for e in events
                if isinstance(e, ev.InstanceVerificationFailedV1) and e.sop_instance_uid == tampered_sop
            ]
            final = [
                e for e in events if isinstance(e, ev.InstanceDeadLetteredV1) and e.sop_instance_uid == tampered_sop
            ]
            return (failed, final) if final and await verified_for(stack, [clean_sop]) else None

        # Every node holds the altered dataset: the failure is re-placed once; failing again on
        # a second node makes it an instance problem, a final dead letter, not a third placement.
        failures, (letter,) = await poll(outcome, timeout=90, what="tampered instance judged on two nodes")
        forwarded = {
            e.placement_id: e
            for e in await log_events(stack, ev.InstanceForwardedV1)
            if e.sop_instance_uid == tampered_sop
        }
        for failed in failures:
            # Compared as datasets: the differing tag is named, never its value.
            assert failed.reason == "dataset differs at (0008,1030)"
            assert failed.study_instance_uid == study_uid
            assert failed.expected_digest == dataset_bytes_digest(tampered_file.read_bytes())
            assert failed.found_digest == dataset_bytes_digest(altered.read_bytes())
            assert failed.node_id == forwarded[failed.placement_id].node_id
        assert [(f.attempt, f.verification_failures) for f in failures] == [(0, 0), (1, 1)]
        assert len({f.node_id for f in failures}) == 2
        assert letter.final and letter.placement_id == failures[1].placement_id
        assert letter.reason.startswith("verification failed on 2 nodes")
        wait_for(
            lambda: stack.metric("scheduler", "switchyard_scheduler_final_dead_letters_total") == 1,
            timeout=20,
            what="the second failure is final",
        )
        assert not await verified_for(stack, [tampered_sop])
        # The catalog shows it dead-lettered for an operator, with the reasons in the trail.
        rows = wait_for(
            lambda: stack.catalog(f"/api/instances?state=dead_lettered&study_uid={study_uid}"),
            timeout=20,
            what="catalog shows the final dead letter",
        )
        assert [(r["sop_instance_uid"], r["node_id"], r["detail"]) for r in rows] == [
            (tampered_sop, failures[1].node_id, letter.reason)
        ]
        trail = stack.catalog(f"/api/instances/{tampered_sop}/trail")
        assert (trail["instance"]["state"], trail["instance"]["verified"]) == ("dead_lettered", False)
        whys = [e["why"] for e in trail["events"] if e["type"] == "instance.verification_failed.v1"]
        assert whys == [
            {"reason": f.reason, "expected_digest": f.expected_digest, "found_digest": f.found_digest} for f in failures
        ]
        assert trail["events"][-1]["type"] == "instance.dead_lettered.v1"
    finally:
        for node, orthanc_id in zip(live_nodes, uploaded, strict=True):
            node.client._request(f"/instances/{orthanc_id}", method="DELETE")


async def test_the_changes_cursor_survives_a_probe_restart(stack, live_nodes, tmp_path):
    first = generate_studies(tmp_path / "a", studies=1, series_per_study=1, instances_per_series=3, seed=5103)
    ((_, first_sops),) = corpus_index(first).items()
    assert stack.send([tmp_path / "a"], extra=["+sd", "+r"]).returncode == 0
    await poll(lambda: verified_for(stack, first_sops), timeout=60, what="first study verified")

    stack.stop("probe")
    second = generate_studies(tmp_path / "b", studies=1, series_per_study=1, instances_per_series=2, seed=5104)
    ((_, second_sops),) = corpus_index(second).items()
    assert stack.send([tmp_path / "b"], extra=["+sd", "+r"]).returncode == 0
    stack.start("probe")

    await poll(lambda: verified_for(stack, second_sops), timeout=60, what="second study verified after restart")
    # The restarted probe read only the node changes after its stored cursor, and
    # published nothing it had published before.
    total = sum(
        stack.metric("probe", "switchyard_probe_changes_seen_total", f'node="{n.node.id}"') or 0 for n in live_nodes
    )
    assert total == len(second_sops)
    published = sum(
        stack.metric("probe", "switchyard_probe_verifications_total", f'node="{n.node.id}",outcome="verified"') or 0
        for n in live_nodes
    )
    assert published == len(second_sops)
    verified = [e for e in await log_events(stack, ev.InstanceVerifiedV1) if e.sop_instance_uid in first_sops]
    assert sorted(e.sop_instance_uid for e in verified) == sorted(first_sops)


async def log_seqs(stack) -> tuple[int, int]:
    """(last sequence of an instance event, last sequence of the stream)."""
    bus = await Bus.connect(stack.cfg.nats, "test-reader")
    try:
        last_instance = max([d.seq async for d in bus.replay("dicom.instance.>")], default=0)
        return last_instance, (await bus.js.stream_info(stack.cfg.nats.events_stream)).state.last_seq
    finally:
        await bus.close()


async def test_probe_rebuild_equals_the_live_stores_and_swaps_in(stack, live_nodes, tmp_path, capsys):
    """Both probe files replayed from the log equal the live ones, table by table (node cursors carried)."""
    from services.probe.store import ProbeStore
    from shared.readmodel.catalog import CatalogStore
    from shared.readmodel.replay import rebuild_file
    from switchyard import cli

    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=5105)
    ((_, sops),) = corpus_index(files).items()
    assert stack.send([tmp_path / "corpus"], extra=["+sd", "+r"]).returncode == 0
    await poll(lambda: verified_for(stack, sops), timeout=60, what="study verified")
    argv = ["--config", str(stack.config_path)]
    # cli.main runs its own event loop, so from this async test it runs in a thread.
    assert await asyncio.to_thread(cli.main, [*argv, "probe", "rebuild"]) == 1  # refuses: the probe holds its files
    assert "stop it" in capsys.readouterr().err
    # The probe must have applied its own outcome events before the snapshot.
    last_instance, last = await log_seqs(stack)
    wait_for(
        lambda: (
            (stack.metric("probe", "switchyard_probe_verify_last_seq") or 0) >= last_instance
            and (stack.metric("probe", "switchyard_probe_qr_last_seq") or 0) >= last
        ),
        timeout=20,
        what="probe stores caught up with the log",
    )
    stack.stop("probe")
    verify_db, qr_db = stack.cfg.probe.db_path, stack.cfg.probe.catalog_db_path
    live_verify, live_qr = dump_all(verify_db), dump_all(qr_db)
    assert set(live_verify) == {"projection_state", "placements", "expected", "node_cursor", "seen"}
    assert live_verify["node_cursor"] and live_verify["seen"]  # the nodes were read
    try:
        for live, factory, seed in (
            (live_verify, ProbeStore, lambda store: store.carry_node_state(verify_db)),
            (live_qr, CatalogStore, None),
        ):
            until = live["projection_state"][0][1]
            fresh = tmp_path / f"fresh-{factory.__name__}.duckdb"
            result = await rebuild_file(stack.cfg.nats, fresh, factory, until_seq=until, swap=False, seed=seed)
            assert result.last_seq == until
            assert dump_all(fresh) == live, factory.__name__  # table by table

        assert await asyncio.to_thread(cli.main, [*argv, "probe", "rebuild"]) == 0
        out = capsys.readouterr().out
        assert out.count("probe store rebuilt") == 2, out
        # Swapped in: what the log says, plus the node cursors carried over.
        rebuilt_verify = dump_all(verify_db)
        assert {t: rows for t, rows in rebuilt_verify.items() if t != "projection_state"} == {
            t: rows for t, rows in live_verify.items() if t != "projection_state"
        }
        assert dump_all(qr_db)["instances"] == live_qr["instances"]
    finally:
        stack.start("probe")
    # The probe runs on the rebuilt files: a new study is verified, and nothing old is judged again.
    more = generate_studies(tmp_path / "more", studies=1, series_per_study=1, instances_per_series=1, seed=5106)
    ((_, more_sops),) = corpus_index(more).items()
    assert stack.send([tmp_path / "more"], extra=["+sd", "+r"]).returncode == 0
    await poll(lambda: verified_for(stack, more_sops), timeout=60, what="new study verified after the rebuild")
    published = sum(
        stack.metric("probe", "switchyard_probe_verifications_total", f'node="{n.node.id}",outcome="verified"') or 0
        for n in live_nodes
    )
    assert published == len(more_sops)


async def test_a_deflated_file_reencoded_by_the_node_is_verified_on_one_node(stack, live_nodes, tmp_path):
    """Orthanc stores a Deflated Explicit VR LE file with other bytes: equal dataset, verified, not re-placed."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    dfl = get_testdata_file("image_dfl.dcm")
    assert isinstance(dfl, str), dfl  # pydicom's own test file, by path
    ds = pydicom.dcmread(dfl)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    # Fresh UIDs: the session's nodes may hold the test file from another test.
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    sop = str(ds.SOPInstanceUID)
    # storescu sends it deflated only when it proposes that transfer syntax.
    assert stack.send([path], extra=["-xd"]).returncode == 0

    async def verified():
        found = [e for e in await log_events(stack, ev.InstanceVerifiedV1) if e.sop_instance_uid == sop]
        return found or None

    (v,) = await poll(verified, timeout=60, what="deflated instance verified")
    (received,) = [e for e in await log_events(stack, ev.InstanceReceivedV1) if e.sop_instance_uid == sop]
    assert received.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert v.reencoded, "the node re-encoded it: the raw digest differs, the dataset does not"
    assert v.dataset_digest != received.dataset_digest
    node = next(n for n in live_nodes if n.node.id == v.node_id)
    assert dataset_bytes_digest(node.client.instance_file(sop)) == v.dataset_digest
    events = await log_events(stack)
    assert [e.attempt for e in events if isinstance(e, ev.InstancePlacedV1) and e.sop_instance_uid == sop] == [0]
    assert not [
        e
        for e in events
        if isinstance(e, (ev.InstanceVerificationFailedV1, ev.InstanceDeadLetteredV1)) and e.sop_instance_uid == sop
    ]
    assert [n.node.id for n in live_nodes if n.client.instance_id(sop) is not None] == [v.node_id]
