"""The whole routing path on real servers: DCMTK storescu -> Switchyard -> Orthanc nodes."""

from __future__ import annotations

import io

import pydicom
import pytest

from shared.dicomfile import dataset_bytes_digest
from switchyard.corpus import corpus_index, generate_studies
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration


def wait_delivered(stack, study_uid: str, expected: int, timeout: float = 60) -> list[dict]:
    """Poll the catalog until every instance of the study is delivered; explain a timeout."""
    last: list[dict] = []

    def done() -> list[dict]:
        nonlocal last
        last = stack.catalog(f"/api/instances?study_uid={study_uid}")
        # The probe may already have verified them (read back from the node).
        return last if len(last) == expected and all(r["state"] in ("forwarded", "verified") for r in last) else []

    try:
        return wait_for(done, timeout=timeout, what=f"study {study_uid} delivered")
    except TimeoutError as exc:
        states = sorted((r["node_id"], r["state"], r["detail"]) for r in last)
        raise AssertionError(f"{exc}\n{len(last)}/{expected} in catalog: {states}\n{stack.diagnostics()}") from None


def holders(nodes, sop_uid: str) -> list[str]:
    return [n.node.id for n in nodes if n.client.instance_id(sop_uid) is not None]


def scheduler_sees(stack, node_id: str, live: bool) -> bool:
    return stack.metric("scheduler", "switchyard_scheduler_node_live", f'node="{node_id}"') == float(live)


def test_multi_series_study_lands_whole_on_one_node_unchanged(stack, live_nodes, tmp_path):
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=3, instances_per_series=3, seed=101)
    ((study_uid, sops),) = corpus_index(files).items()
    result = stack.send([tmp_path / "corpus"], extra=["+sd", "+r"])
    assert result.returncode == 0, result.stderr

    rows = wait_delivered(stack, study_uid, len(files))
    nodes_in_catalog = {r["node_id"] for r in rows}
    assert len(nodes_in_catalog) == 1, nodes_in_catalog
    (node_id,) = nodes_in_catalog
    assert {r["sop_instance_uid"] for r in rows} == set(sops)

    by_sop = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    node = next(n for n in live_nodes if n.node.id == node_id)
    for sop_uid in sops:
        # Exactly one node holds each instance, and it is the catalog's node.
        assert holders(live_nodes, sop_uid) == [node_id]
        stored = node.client.instance_file(sop_uid)
        sent = by_sop[sop_uid].read_bytes()
        # Byte-identical dataset (file meta is rewritten by every hop, the dataset never).
        assert dataset_bytes_digest(stored) == dataset_bytes_digest(sent)
        assert pydicom.dcmread(io.BytesIO(stored)) == pydicom.dcmread(by_sop[sop_uid])
    catalog_digests = {r["sop_instance_uid"]: r["dataset_digest"] for r in rows}
    assert catalog_digests == {s: dataset_bytes_digest(by_sop[s].read_bytes()) for s in sops}


def test_new_studies_avoid_a_stopped_node(stack, live_nodes, tmp_path):
    stopped = live_nodes[1]
    wait_for(
        lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes),
        timeout=20,
        what="scheduler sees every node live",
    )
    stopped.stop()
    wait_for(
        lambda: scheduler_sees(stack, stopped.node.id, False), timeout=20, what="scheduler sees the stopped node down"
    )

    files = generate_studies(tmp_path / "corpus", studies=6, series_per_study=1, instances_per_series=2, seed=202)
    index = corpus_index(files)
    result = stack.send([tmp_path / "corpus"], extra=["+sd", "+r"])
    assert result.returncode == 0, result.stderr

    used = set()
    for study_uid, sops in index.items():
        rows = wait_delivered(stack, study_uid, len(sops))
        used |= {r["node_id"] for r in rows}
        assert len({r["node_id"] for r in rows}) == 1
    assert stopped.node.id not in used
    # Six new studies over two equal live nodes: both get work.
    assert len(used) == 2, used
