"""The front door closed by default, per-AE rights, broad retrieves refused, per-peer limits.

Against a real probe (with ingest to feed it), peers DCMTK findscu/getscu/movescu
and pynetdicom (to read the A-ASSOCIATE-RJ fields and the negotiated contexts).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from shared.config import QRPeer
from switchyard import stack as ls
from tests.fixtures.qr import dcmtk, find, identical, refused, rejected, send_study
from tests.fixtures.servers import Stack, StoreSCP, make_stack
from tests.fixtures.util import free_port, wait_for

pytestmark = pytest.mark.integration

FINDER, GETTER, HOG = "FINDONLY", "GETTER", "HOGSCU"
PER_PEER = 4
STUDY = ["-k", "QueryRetrieveLevel=STUDY"]
CT = "1.2.840.10008.5.1.4.1.1.2"


def rights_stack(data_dir: Path, nodes, storescp_at: str = "") -> Stack:
    """ingest and probe; FINDER may find, GETTER and HOG find and retrieve (KNOWNSCU for send_study)."""

    def configure(cfg):
        peers = [
            QRPeer(ae=FINDER, host="127.0.0.1", rights=["find"]),
            QRPeer(ae=GETTER, host="127.0.0.1", rights=["find", "retrieve"]),
            QRPeer(ae=HOG, rights=["find", "retrieve"]),
            QRPeer(ae="KNOWNSCU", rights=["find"]),
        ]
        probe = msgspec.structs.replace(
            cfg.probe,
            qr_peers=peers,
            qr_network_timeout_s=10.0,
            qr_max_associations_per_peer=PER_PEER,
            qr_max_associations=16,
            move_destinations=[storescp_at] if storescp_at else [],
        )
        return msgspec.structs.replace(cfg, probe=probe)

    return make_stack(data_dir, nodes, ("ingest", "probe"), configure)


@pytest.fixture(scope="module")
def mover(tmp_path_factory):
    """DCMTK storescp, the one C-MOVE destination of the module's front door."""
    base = tmp_path_factory.mktemp("qr-rights-storescp")
    scp = StoreSCP(free_port(), base / "received", "STORESCP")
    proc = ls.start_storescp(scp.port, scp.out_dir, base / "storescp.log", scp.ae_title)
    yield scp
    proc.stop()


@pytest.fixture(scope="module")
def rights(orthanc_nodes, mover, tmp_path_factory):
    stack = rights_stack(
        tmp_path_factory.mktemp("qr-rights"), orthanc_nodes, f"{mover.ae_title}@127.0.0.1:{mover.port}"
    )
    try:
        study_uid, files = send_study(stack, tmp_path_factory.mktemp("qr-rights-corpus"), 5401)
        yield stack, study_uid, files
    finally:
        stack.close()


def associate(stack: Stack, aet: str, *contexts: str) -> Association:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate(
        "127.0.0.1",
        stack.cfg.probe.qr_port,
        ae_title=stack.cfg.probe.qr_ae_title,
        ext_neg=[build_role(CT, scp_role=True)],
    )


def test_closed_by_default(orthanc_nodes, tmp_path_factory):
    """No peers configured: every association is refused, and the log says how to open the door."""

    def closed(cfg):
        return msgspec.structs.replace(cfg, probe=msgspec.structs.replace(cfg.probe, qr_peers=[]))

    stack = make_stack(tmp_path_factory.mktemp("qr-closed"), orthanc_nodes, ("probe",), closed)
    try:
        for aet in ("TESTSCU", "ANYONE"):
            result = dcmtk(stack, "findscu", "-v", "-S", *STUDY, "-k", "StudyInstanceUID=", aet=aet)
            assert rejected(result, "Calling AE Title Not Recognized"), result.stdout + result.stderr
        assoc = associate(stack, "TESTSCU", StudyRootQueryRetrieveInformationModelFind)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        log = stack.log("probe")
        assert "Q/R front door closed" in log and "probe.qr_peers" in log
    finally:
        stack.close()


def test_find_only_peer_gets_no_retrieve(rights, tmp_path):
    stack, study_uid, files = rights
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid}
    assert [str(d.StudyInstanceUID) for d in find(stack, tmp_path, "-S", keys, aet=FINDER)] == [study_uid]
    # C-GET and C-MOVE contexts are refused at negotiation; C-FIND is accepted on the same association.
    assoc = associate(
        stack,
        FINDER,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert StudyRootQueryRetrieveInformationModelFind in accepted
        assert not accepted & {StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove}
    finally:
        assoc.release()
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(stack, "getscu", "-v", "-S", "-od", str(out), *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=FINDER)
    assert got.returncode != 0 and "presentation context" in (got.stdout + got.stderr).lower(), got.stdout + got.stderr
    moved = dcmtk(
        stack, "movescu", "-v", "-S", "-aem", "STORESCP", *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=FINDER
    )
    # (movescu exits 0 even so.)
    assert "no valid presentation context" in (moved.stdout + moved.stderr).lower(), moved.stdout + moved.stderr
    assert not list(out.iterdir())
    # The same study, for a peer with the retrieve right.
    got = dcmtk(stack, "getscu", "-S", "-od", str(out), *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=GETTER)
    assert got.returncode == 0, got.stdout + got.stderr
    assert identical(sorted(out.iterdir()), files)


@pytest.mark.parametrize(
    "keys",
    [
        [],
        ["-k", "PatientID=*"],
        ["-k", "PatientID="],
        ["-k", "AccessionNumber=*"],
        ["-k", "PatientName=*", "-k", "StudyInstanceUID="],
    ],
)
def test_broad_retrieve_is_refused(rights, mover, tmp_path, keys):
    stack, study_uid, files = rights
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(stack, "getscu", "-v", "-S", "-od", str(out), *STUDY, *keys, aet=GETTER)
    assert refused(got, 0xA900, "DataSetDoesNotMatchSOPClass"), got.stdout + got.stderr
    assert not list(out.iterdir())
    before = len(mover.received())
    moved = dcmtk(stack, "movescu", "-v", "-S", "-aem", mover.ae_title, *STUDY, *keys, aet=GETTER)
    assert refused(moved, 0xA900, "DataSetDoesNotMatchSOPClass"), moved.stdout + moved.stderr
    assert len(mover.received()) == before
    # The Error Comment says what is missing.
    assoc = associate(stack, GETTER, StudyRootQueryRetrieveInformationModelGet)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        ((status, _),) = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
        assert int(status.Status) == 0xA900 and "StudyInstanceUID" in str(status.ErrorComment)
    finally:
        assoc.release()


def test_a_named_study_is_still_moved(rights, mover):
    stack, study_uid, files = rights
    for p in mover.received():
        p.unlink()
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    moved = dcmtk(
        stack, "movescu", "-S", "-aem", mover.ae_title, *STUDY, "-k", f"PatientID={header.PatientID}", aet=GETTER
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    wait_for(lambda: len(mover.received()) == len(files), timeout=20, what="storescp got the study")
    assert identical(mover.received(), files)


def test_held_associations_from_one_peer_do_not_lock_out_another(rights, tmp_path):
    stack, study_uid, _ = rights
    held: list[Association] = []
    try:
        # Nine held associations (the lock-out): the peer gets its share, the rest are refused.
        for _ in range(9):
            assoc = associate(stack, HOG, StudyRootQueryRetrieveInformationModelFind)
            if assoc.is_established:
                held.append(assoc)
            else:
                assert assoc.is_rejected
                rj = assoc.acceptor.primitive
                assert rj is not None
                # rejected-transient, service-provider (presentation), local-limit-exceeded
                assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert len(held) == PER_PEER
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid}
        for aet in (GETTER, FINDER):
            assert [str(d.StudyInstanceUID) for d in find(stack, tmp_path, "-S", keys, aet=aet)] == [study_uid]
        log = stack.log("probe")
        assert f"'{HOG}' from 127.0.0.1 already holds {PER_PEER} associations" in log
    finally:
        for assoc in held:
            assoc.release()
    # Released slots are free again.
    again = associate(stack, HOG, StudyRootQueryRetrieveInformationModelFind)
    assert again.is_established
    again.release()


def test_dcmtk_sees_the_limit_as_a_rejection(rights):
    stack, study_uid, _ = rights
    held = [associate(stack, HOG, StudyRootQueryRetrieveInformationModelFind) for _ in range(PER_PEER)]
    try:
        assert all(a.is_established for a in held)
        result: subprocess.CompletedProcess = dcmtk(
            stack, "findscu", "-v", "-S", *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=HOG
        )
        assert rejected(result, "Local Limit Exceeded"), result.stdout + result.stderr
    finally:
        for a in held:
            a.release()
