"""Bad input gets a clean answer while another association keeps storing successfully.

After each case: no blob and no received event for the failed instance, no
spool file left behind, and the service still serves.
"""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import msgspec
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage

from switchyard import stack as ls
from switchyard.corpus import generate_studies
from shared.dimse import NODELAY_HANDLER, settle
from tests.fixtures.servers import Stack, make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

GOOD_AE = "GOODSCU"
BACKGROUND_AE = "BACKGROUND"
MAX_OBJECT = 256 * 1024
MAX_ASSOCIATIONS = 4


@pytest.fixture(scope="module")
def ingest(orthanc_nodes, tmp_path_factory):
    """Ingest alone, with an allowlist, a small object limit and short timeouts."""
    def configure(cfg):
        return msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(
            cfg.ingest, allowed_calling_aes=[GOOD_AE, BACKGROUND_AE],
            allowed_peers=["LOCALONLY@127.0.0.1", "ELSEWHERE@192.0.2.7"],
            max_object_bytes=MAX_OBJECT, max_associations=MAX_ASSOCIATIONS, network_timeout_s=3.0))

    stack = make_stack(tmp_path_factory.mktemp("ingest-bad-input"), orthanc_nodes, ("ingest",), configure)
    yield stack
    stack.close()


# ---------------------------------------------------------------- helpers

def received_uids(stack: Stack) -> set[str]:
    return {e.sop_instance_uid for e in stack.received_events()}


def blob_holding(stack: Stack, uid: str) -> list[Path]:
    needle = uid.encode()
    return [p for p in stack.blob_files() if needle in p.read_bytes()]


def spool_holding(stack: Stack, uid: str) -> list[Path]:
    spool = Path(stack.cfg.ingest.spool_dir)
    needle = uid.encode()
    found = []
    for p in spool.glob("*"):
        try:
            if needle in p.read_bytes():
                found.append(p)
        except FileNotFoundError:
            pass
    return found


def assert_nothing_kept(stack: Stack, uid: str) -> None:
    wait_for(lambda: not spool_holding(stack, uid), timeout=15, what=f"spool free of {uid}")
    assert blob_holding(stack, uid) == []
    assert uid not in received_uids(stack)


def one_instance(tmp_path: Path, seed: int, rows: int = 16, cols: int = 16) -> Path:
    return generate_studies(tmp_path / f"c{seed}", studies=1, series_per_study=1, instances_per_series=1,
                            seed=seed, rows=rows, cols=cols)[0]


def assert_still_serves(stack: Stack, tmp_path: Path, seed: int) -> None:
    path = one_instance(tmp_path, seed)
    result = stack.send([path], calling_ae=GOOD_AE, extra=["-v"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert pydicom.dcmread(path).SOPInstanceUID in received_uids(stack)


def sender_ae() -> AE:
    ae = AE(ae_title=GOOD_AE)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


class Background:
    """One association storing small CT instances, one after another, until stopped."""

    def __init__(self, stack: Stack, files: list[Path]) -> None:
        self.stack, self.files = stack, files
        self.statuses: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            ae = AE(ae_title=BACKGROUND_AE)
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            ae.network_timeout = ae.dimse_timeout = 10
            assoc = ae.associate("127.0.0.1", self.stack.cfg.ingest.port, ae_title=self.stack.cfg.ingest.ae_title,
                                 evt_handlers=[NODELAY_HANDLER])
            assert assoc.is_established, "background association not established"
            try:
                i = 0
                # Stay below the network timeout between stores: keep sending.
                while not self._stop.is_set() or not self.statuses:
                    settle(assoc)
                    rsp = assoc.send_c_store(pydicom.dcmread(self.files[i % len(self.files)]))
                    self.statuses.append(int(rsp.Status) if rsp else -1)
                    i += 1
            finally:
                assoc.release()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def start(self) -> Background:
        self._thread.start()
        wait_for(lambda: self.statuses or self.error, timeout=20, what="background stores")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, repr(self.error)
        assert self.statuses and all(s == 0 for s in self.statuses), self.statuses


@pytest.fixture(scope="module")
def background_files(tmp_path_factory) -> list[Path]:
    return generate_studies(tmp_path_factory.mktemp("bg"), studies=1, series_per_study=1, instances_per_series=5,
                            seed=900, rows=16, cols=16)


@pytest.fixture
def background(ingest, background_files):
    bg = Background(ingest, background_files).start()
    yield bg
    bg.stop()


def store_pdus(ds: pydicom.Dataset, command_uid: str, context_id: int, max_pdu: int) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of one C-STORE-RQ, written by hand (command, then dataset)."""
    prim = C_STORE()
    prim.MessageID = 7
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = command_uid
    prim.Priority = 2
    prim.DataSet = io.BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdus = []
    for p_data in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(pdu.encode())
    return pdus


def raw_association(stack: Stack):
    assoc = sender_ae().associate("127.0.0.1", stack.cfg.ingest.port, ae_title=stack.cfg.ingest.ae_title)
    assert assoc.is_established
    cx = assoc.accepted_contexts[0]
    return assoc, cx.context_id, assoc.acceptor.maximum_length


def closed_by_server(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Read until the server closes the connection; return everything it sent."""
    sock.settimeout(timeout)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk


# ---------------------------------------------------------------- cases

def test_non_dicom_bytes_are_dropped(ingest, background, tmp_path):
    with socket.create_connection(("127.0.0.1", ingest.cfg.ingest.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: switchyard\r\n\r\n" + bytes(range(256)) * 64)
        answer = closed_by_server(sock)
    # Either a plain close or an A-ABORT PDU (type 0x07), never anything else.
    assert answer == b"" or answer[:1] == b"\x07", answer[:32]
    assert_still_serves(ingest, tmp_path, 1)


def test_silent_connection_is_closed_after_the_network_timeout(ingest, background, tmp_path):
    with socket.create_connection(("127.0.0.1", ingest.cfg.ingest.port)) as sock:
        answer = closed_by_server(sock, timeout=ingest.cfg.ingest.network_timeout_s + 10)
    assert answer == b"" or answer[:1] == b"\x07", answer[:32]
    assert_still_serves(ingest, tmp_path, 2)


def test_association_aborted_mid_dataset_keeps_nothing(ingest, background, tmp_path):
    path = one_instance(tmp_path, 3, rows=128, cols=128)
    ds = pydicom.dcmread(path)
    assoc, cx_id, max_pdu = raw_association(ingest)
    pdus = store_pdus(ds, ds.SOPInstanceUID, cx_id, min(max_pdu, 16384))
    assert len(pdus) > 3
    sock = assoc.dul.socket.socket
    for pdu in pdus[: len(pdus) // 2]:
        sock.sendall(pdu)
    wait_for(lambda: spool_holding(ingest, ds.SOPInstanceUID), timeout=10, what="partial dataset spooled")
    assoc.abort()
    assert_nothing_kept(ingest, ds.SOPInstanceUID)
    assert ingest.metric("ingest", "switchyard_ingest_spool_discarded_total") >= 1
    assert_still_serves(ingest, tmp_path, 4)


def test_truncated_pdata_keeps_nothing(ingest, background, tmp_path):
    path = one_instance(tmp_path, 5, rows=128, cols=128)
    ds = pydicom.dcmread(path)
    assoc, cx_id, max_pdu = raw_association(ingest)
    pdus = store_pdus(ds, ds.SOPInstanceUID, cx_id, min(max_pdu, 16384))
    sock = assoc.dul.socket.socket
    for pdu in pdus[:-1]:
        sock.sendall(pdu)
    last = pdus[-1]
    sock.sendall(last[: len(last) // 2])  # the PDU header promises more than ever arrives
    sock.shutdown(socket.SHUT_WR)
    # The server gives up on the connection (network timeout or EOF) and keeps nothing.
    wait_for(lambda: not assoc.is_alive() or assoc.is_aborted, timeout=20, what="association ended")
    assert_nothing_kept(ingest, ds.SOPInstanceUID)
    assert_still_serves(ingest, tmp_path, 6)


def test_unknown_calling_ae_is_rejected(ingest, background, tmp_path):
    path = one_instance(tmp_path, 7)
    result = ingest.send([path], calling_ae="STRANGER", extra=["-v"])
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in out and "Calling AE Title Not Recognized" in out, out
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    assert "STRANGER" in ingest.log("ingest")
    assert_still_serves(ingest, tmp_path, 8)


def test_wrong_called_ae_is_rejected(ingest, background, tmp_path):
    path = one_instance(tmp_path, 9)
    result = ls.storescu("127.0.0.1", ingest.cfg.ingest.port, "NOTUS", [path], calling_ae=GOOD_AE, extra=["-v"])
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in out and "Called AE Title Not Recognized" in out, out
    assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    assert_still_serves(ingest, tmp_path, 10)


def test_peer_bound_to_another_address_is_rejected(ingest, background, tmp_path):
    path = one_instance(tmp_path, 11)
    refused = ingest.send([path], calling_ae="ELSEWHERE", extra=["-v"])
    out = refused.stdout + refused.stderr
    assert "Calling AE Title Not Recognized" in out, out
    assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    accepted = ingest.send([path], calling_ae="LOCALONLY", extra=["-v"])
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert pydicom.dcmread(path).SOPInstanceUID in received_uids(ingest)


def test_object_over_the_size_limit_is_refused(ingest, background, tmp_path):
    path = one_instance(tmp_path, 12, rows=512, cols=512)  # 512 KiB of pixels > MAX_OBJECT
    result = ingest.send([path], calling_ae=GOOD_AE, extra=["-v"])
    out = result.stdout + result.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in out, out
    assoc = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
    try:
        rsp = assoc.send_c_store(pydicom.dcmread(path))
        assert int(rsp.Status) == 0xC002, rsp
    finally:
        assoc.release()
    assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    assert_still_serves(ingest, tmp_path, 13)


def test_dataset_uid_differing_from_the_command_is_refused(ingest, background, tmp_path, monkeypatch):
    path = one_instance(tmp_path, 14)
    ds = pydicom.dcmread(path)
    command_uid = generate_uid()
    # pynetdicom sends a file unchanged and takes the command's UID from its file meta.
    ds.file_meta.MediaStorageSOPInstanceUID = command_uid
    lying = tmp_path / "lying.dcm"
    ds.save_as(lying, enforce_file_format=False)  # True would "fix" the meta UID
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
    try:
        rsp = assoc.send_c_store(lying)
        assert rsp is not None and int(rsp.Status) == 0xC001, rsp
    finally:
        assoc.release()
    assert_nothing_kept(ingest, ds.SOPInstanceUID)
    assert_nothing_kept(ingest, command_uid)
    assert_still_serves(ingest, tmp_path, 15)


def test_association_limit_rejects_with_local_limit_exceeded(ingest, background, tmp_path):
    held = []
    try:
        # The background sender holds one association already.
        for _ in range(MAX_ASSOCIATIONS - 1):
            assoc = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
            assert assoc.is_established
            held.append(assoc)
        extra = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
        assert extra.is_rejected
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert ingest.metric("ingest", "switchyard_ingest_open_associations") == MAX_ASSOCIATIONS
    finally:
        for assoc in held:
            assoc.release()
    assert_still_serves(ingest, tmp_path, 16)


def test_idle_association_is_aborted_after_the_network_timeout(ingest, background):
    assoc = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
    assert assoc.is_established
    wait_for(lambda: not assoc.is_established, timeout=ingest.cfg.ingest.network_timeout_s + 10,
             what="idle association ended by the server")
    assert assoc.is_aborted or assoc.is_released


def test_object_store_unavailable_answers_out_of_resources(ingest, tmp_path):
    path = one_instance(tmp_path, 17)
    uid = pydicom.dcmread(path).SOPInstanceUID
    root = Path(ingest.cfg.blobs.path)
    aside = root.with_name(root.name + ".aside")
    root.rename(aside)
    root.write_bytes(b"not a directory")  # every write under the root now fails
    try:
        result = ingest.send([path], calling_ae=GOOD_AE, extra=["-v"])
        out = result.stdout + result.stderr
        assert "Received Store Response (Refused: OutOfResources)" in out, out
        assert "blob store refused" in ingest.log("ingest")
    finally:
        root.unlink()
        aside.rename(root)
    assert_nothing_kept(ingest, uid)
    # The sender retries once the store is back: accepted, announced once.
    again = ingest.send([path], calling_ae=GOOD_AE, extra=["-v"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert sum(e.sop_instance_uid == uid for e in ingest.received_events()) == 1
    assert len(blob_holding(ingest, uid)) == 1


def test_metrics_account_for_every_answer(ingest):
    # After all cases above (rejections, aborts, drops) the gauge is back to what is open.
    wait_for(lambda: ingest.metric("ingest", "switchyard_ingest_open_associations") == 0, timeout=20,
             what="open associations back to 0")
    m = lambda name, labels="": ingest.metric("ingest", name, labels) or 0.0  # noqa: E731
    assert m("switchyard_ingest_associations_rejected_total") >= 5  # calling AE x2, called AE, address, limit
    assert m("switchyard_ingest_associations_aborted_total") >= 2
    for status in ("0x0000", "0xC001", "0xC002", "0xA700"):
        assert m("switchyard_ingest_cstore_status_total", f'status="{status}"') >= 1, status
    accepted = m("switchyard_ingest_instances_total")
    assert accepted == len(ingest.received_events())
    assert m("switchyard_ingest_bytes_total") == sum(e.size for e in ingest.received_events())
    assert m("switchyard_ingest_receive_to_ack_seconds_count") == sum(
        m("switchyard_ingest_cstore_status_total", f'status="{s}"') for s in ("0x0000", "0xC001", "0xC002", "0xA700"))
