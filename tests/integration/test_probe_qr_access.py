"""Who may use the PACS front door: calling AE allowlist, called AE, and DICOM over TLS.

The same rules as ingest (shared/access.py), checked at association: an
unknown peer gets no C-FIND, C-MOVE or C-GET at all. Peers are DCMTK findscu,
movescu and getscu (findscu with +tls for the TLS front door), and pynetdicom to read
the A-ASSOCIATE-RJ fields and to C-GET over TLS (DCMTK 3.6.7's getscu has none).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet

from tests.fixtures.pki import client_context
from tests.fixtures.qr import KNOWN, dcmtk, find, identical, refused, rejected, send_study
from tests.fixtures.servers import Stack, make_stack

pytestmark = pytest.mark.integration


def guarded_stack(data_dir: Path, nodes, tls: dict[str, Path] | None = None) -> Stack:
    """ingest and probe; the front door admits KNOWN anywhere and LOCALONLY from 127.0.0.1 only."""

    def configure(cfg):
        probe = msgspec.structs.replace(
            cfg.probe,
            qr_allowed_calling_aes=[KNOWN],
            qr_allowed_peers=["LOCALONLY@127.0.0.1", "ELSEWHERE@192.0.2.7"],
            qr_network_timeout_s=5.0,
        )
        if tls:
            probe = msgspec.structs.replace(
                probe,
                qr_tls_cert_file=str(tls["server_crt"]),
                qr_tls_key_file=str(tls["server_key"]),
                qr_tls_ca_file=str(tls["ca"]),
            )
        return msgspec.structs.replace(cfg, probe=probe)

    return make_stack(data_dir, nodes, ("ingest", "probe"), configure)


@pytest.fixture(scope="module")
def guarded(orthanc_nodes, tmp_path_factory):
    stack = guarded_stack(tmp_path_factory.mktemp("qr-access"), orthanc_nodes)
    try:
        study_uid, files = send_study(stack, tmp_path_factory.mktemp("qr-access-corpus"), 5301)
        yield stack, study_uid, files
    finally:
        stack.close()


STUDY = ["-k", "QueryRetrieveLevel=STUDY"]


def test_unknown_calling_ae_gets_no_find_move_or_get(guarded, tmp_path):
    stack, study_uid, files = guarded
    key = ["-k", f"StudyInstanceUID={study_uid}"]
    out = tmp_path / "get"
    out.mkdir()
    # getscu prints no reason, only that the association was rejected (the reason is read below).
    for tool, args, reason in (
        ("findscu", ["-S", *STUDY, *key], "Calling AE Title Not Recognized"),
        ("movescu", ["-S", "-aem", KNOWN, *STUDY, *key], "Calling AE Title Not Recognized"),
        ("getscu", ["-S", "-od", str(out), *STUDY, *key], ""),
    ):
        result = dcmtk(stack, tool, "-v", *args, aet="STRANGER")
        assert rejected(result, reason), (tool, result.stdout + result.stderr)
    assert not list(out.iterdir())
    # The standard reason: rejected-permanent, service-user, calling-AE-title-not-recognized.
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", stack.cfg.probe.qr_port, ae_title=stack.cfg.probe.qr_ae_title)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    # Logged with AE titles and address only: nothing about the patients of the study.
    log = stack.log("probe")
    assert "'STRANGER'" in log and "127.0.0.1" in log
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(header.PatientID) not in log and str(header.PatientName) not in log


def test_wrong_called_ae_is_rejected(guarded):
    stack, study_uid, _ = guarded
    result = dcmtk(stack, "findscu", "-v", "-S", *STUDY, aet=KNOWN, aec="NOT_THE_QR")
    assert rejected(result, "Called AE Title Not Recognized"), result.stdout + result.stderr


def test_peer_bound_to_another_address_is_rejected(guarded, tmp_path):
    stack, study_uid, _ = guarded
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid}
    elsewhere = dcmtk(stack, "findscu", "-v", "-S", *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet="ELSEWHERE")
    assert rejected(elsewhere, "Calling AE Title Not Recognized"), elsewhere.stdout + elsewhere.stderr
    assert [str(d.StudyInstanceUID) for d in find(stack, tmp_path, "-S", keys, aet="LOCALONLY")] == [study_uid]


def test_known_ae_finds_gets_and_moves(guarded, tmp_path):
    stack, study_uid, files = guarded
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid, "NumberOfStudyRelatedInstances": ""}
    (answer,) = find(stack, tmp_path, "-S", keys, aet=KNOWN)
    assert int(answer.NumberOfStudyRelatedInstances) == len(files)
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(stack, "getscu", "-S", "-od", str(out), *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=KNOWN)
    assert got.returncode == 0, got.stdout + got.stderr
    assert identical(sorted(out.iterdir()), files)
    # Past the association check, C-MOVE reaches its handler (which knows no such destination).
    moved = dcmtk(
        stack, "movescu", "-S", "-v", "-aem", "NOWHERE", *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=KNOWN
    )
    assert refused(moved, 0xA801, "MoveDestinationUnknown"), moved.stdout + moved.stderr


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def guarded_tls(orthanc_nodes, pki, tmp_path_factory):
    stack = guarded_stack(tmp_path_factory.mktemp("qr-tls"), orthanc_nodes, tls=pki)
    try:
        study_uid, files = send_study(
            stack, tmp_path_factory.mktemp("qr-tls-corpus"), 5302, *tls_options(pki, "client")
        )
        yield stack, study_uid, files
    finally:
        stack.close()


def tls_options(pki, cert: str) -> list[str]:
    """DCMTK's TLS: our key and certificate, trusting the test CA."""
    return ["+tls", str(pki[f"{cert}_key"]), str(pki[f"{cert}_crt"]), "-pw", "+cf", str(pki["ca"])]


def test_find_and_get_over_mutual_tls(guarded_tls, pki, tmp_path):
    stack, study_uid, files = guarded_tls
    tls = tls_options(pki, "client")
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid}
    assert [str(d.StudyInstanceUID) for d in find(stack, tmp_path, "-S", keys, *tls, aet=KNOWN)] == [study_uid]
    # DCMTK 3.6.7's getscu has no TLS: pynetdicom is the C-GET peer here.
    statuses, received = get_over_tls(stack, pki, study_uid, files, tmp_path / "get")
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert identical(received, files)


def get_over_tls(stack: Stack, pki, study_uid: str, files: list[Path], out: Path) -> tuple[list[int], list[Path]]:
    """C-GET of a study with pynetdicom over mutual TLS: (statuses, files written)."""
    out.mkdir()
    meta = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta
    ae = AE(ae_title=KNOWN)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])

    def on_store(event) -> int:
        (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    assoc = ae.associate(
        "127.0.0.1",
        stack.cfg.probe.qr_port,
        ae_title=stack.cfg.probe.qr_ae_title,
        ext_neg=[build_role(meta.MediaStorageSOPClassUID, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        tls_args=(client_context(pki), "127.0.0.1"),
    )
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        statuses = [
            int(status.Status)
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            if status
        ]
    finally:
        assoc.release()
    return statuses, sorted(out.iterdir())


@pytest.mark.parametrize("client", ["plain", "untrusted-client-cert"])
def test_peers_without_a_trusted_certificate_get_no_association(guarded_tls, pki, tmp_path, client):
    stack, study_uid, _ = guarded_tls
    options = [] if client == "plain" else tls_options(pki, "rogue")
    result = dcmtk(stack, "findscu", *options, "-S", *STUDY, "-k", f"StudyInstanceUID={study_uid}", aet=KNOWN)
    assert result.returncode != 0
    assert "Association Rejected" not in result.stdout + result.stderr  # never got as far as the ACSE
    # The front door keeps serving trusted peers.
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid}
    assert len(find(stack, tmp_path, "-S", keys, *tls_options(pki, "client"), aet=KNOWN)) == 1


def test_a_trusted_certificate_does_not_bypass_the_allowlist(guarded_tls, pki):
    stack, study_uid, _ = guarded_tls
    result = dcmtk(stack, "findscu", *tls_options(pki, "client"), "-v", "-S", *STUDY, aet="STRANGER")
    assert rejected(result, "Calling AE Title Not Recognized"), result.stdout + result.stderr
