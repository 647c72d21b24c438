"""Bad input gets a clean answer while another association keeps storing successfully.

After each case: no blob and no received event for the failed instance, no
spool file left behind, and the service still serves. Datasets no node would
accept (issue #13: structural defects, invalid UIDs, an event too big for the
bus) are answered 0xC000 with a value-free Error Comment while a concurrent
good sender keeps being answered within 2 s.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import msgspec
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from shared.dimse import NODELAY_HANDLER, settle
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.factories import store_pdus
from tests.fixtures.servers import Stack, make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

GOOD_AE = "GOODSCU"
BACKGROUND_AE = "BACKGROUND"
MAX_OBJECT = 1536 * 1024  # room for the 1.1 MB tag; the size-limit case sends 2 MiB
MAX_ASSOCIATIONS = 4


@pytest.fixture(scope="module")
def ingest(orthanc_nodes, tmp_path_factory):
    """Ingest alone, with an allowlist, a small object limit and short timeouts."""

    def configure(cfg):
        return msgspec.structs.replace(
            cfg,
            ingest=msgspec.structs.replace(
                cfg.ingest,
                allowed_calling_aes=[GOOD_AE, BACKGROUND_AE],
                allowed_peers=["LOCALONLY@127.0.0.1", "ELSEWHERE@192.0.2.7"],
                max_object_bytes=MAX_OBJECT,
                max_associations=MAX_ASSOCIATIONS,
                network_timeout_s=3.0,
            ),
        )

    stack = make_stack(tmp_path_factory.mktemp("ingest-bad-input"), orthanc_nodes, ("ingest",), configure)
    yield stack
    stack.close()


# ---------------------------------------------------------------- helpers


async def received_uids(stack: Stack) -> set[str]:
    return {e.sop_instance_uid for e in await stack.received_events()}


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


async def assert_nothing_kept(stack: Stack, uid: str) -> None:
    wait_for(lambda: not spool_holding(stack, uid), timeout=15, what=f"spool free of {uid}")
    assert blob_holding(stack, uid) == []
    assert uid not in await received_uids(stack)


def one_instance(tmp_path: Path, seed: int, rows: int = 16, cols: int = 16) -> Path:
    return generate_studies(
        tmp_path / f"c{seed}", studies=1, series_per_study=1, instances_per_series=1, seed=seed, rows=rows, cols=cols
    )[0]


async def assert_still_serves(stack: Stack, tmp_path: Path, seed: int) -> None:
    path = one_instance(tmp_path, seed)
    result = stack.send([path], calling_ae=GOOD_AE, extra=["-v"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert pydicom.dcmread(path).SOPInstanceUID in await received_uids(stack)


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
        self.answered: list[tuple[float, float]] = []  # (when sent, seconds to the answer)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            ae = AE(ae_title=BACKGROUND_AE)
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            ae.network_timeout = ae.dimse_timeout = 10
            assoc = ae.associate(
                "127.0.0.1",
                self.stack.cfg.ingest.port,
                ae_title=self.stack.cfg.ingest.ae_title,
                evt_handlers=[NODELAY_HANDLER],
            )
            assert assoc.is_established, "background association not established"
            try:
                i = 0
                # Stay below the network timeout between stores: keep sending.
                while not self._stop.is_set() or not self.statuses:
                    settle(assoc)
                    ds = pydicom.dcmread(self.files[i % len(self.files)])
                    sent = time.monotonic()
                    rsp = assoc.send_c_store(ds)
                    self.answered.append((sent, time.monotonic() - sent))
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

    def slowest_since(self, since: float, until: float) -> tuple[int, float]:
        """(stores sent in [since, until], the slowest one's seconds to the answer)."""
        window = [took for sent, took in self.answered if since <= sent <= until]
        return len(window), max(window, default=0.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, repr(self.error)
        assert self.statuses and all(s == 0 for s in self.statuses), self.statuses


@pytest.fixture(scope="module")
def background_files(tmp_path_factory) -> list[Path]:
    return generate_studies(
        tmp_path_factory.mktemp("bg"), studies=1, series_per_study=1, instances_per_series=5, seed=900, rows=16, cols=16
    )


@pytest.fixture
def background(ingest, background_files):
    bg = Background(ingest, background_files).start()
    yield bg
    bg.stop()


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


async def test_non_dicom_bytes_are_dropped(ingest, background, tmp_path):
    with socket.create_connection(("127.0.0.1", ingest.cfg.ingest.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: switchyard\r\n\r\n" + bytes(range(256)) * 64)
        answer = closed_by_server(sock)
    # Either a plain close or an A-ABORT PDU (type 0x07), never anything else.
    assert answer == b"" or answer[:1] == b"\x07", answer[:32]
    await assert_still_serves(ingest, tmp_path, 1)


async def test_silent_connection_is_closed_after_the_network_timeout(ingest, background, tmp_path):
    with socket.create_connection(("127.0.0.1", ingest.cfg.ingest.port)) as sock:
        answer = closed_by_server(sock, timeout=ingest.cfg.ingest.network_timeout_s + 10)
    assert answer == b"" or answer[:1] == b"\x07", answer[:32]
    await assert_still_serves(ingest, tmp_path, 2)


async def test_association_aborted_mid_dataset_keeps_nothing(ingest, background, tmp_path):
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
    await assert_nothing_kept(ingest, ds.SOPInstanceUID)
    assert ingest.metric("ingest", "switchyard_ingest_spool_discarded_total") >= 1
    await assert_still_serves(ingest, tmp_path, 4)


async def test_truncated_pdata_keeps_nothing(ingest, background, tmp_path):
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
    await assert_nothing_kept(ingest, ds.SOPInstanceUID)
    await assert_still_serves(ingest, tmp_path, 6)


async def test_unknown_calling_ae_is_rejected(ingest, background, tmp_path):
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
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    await assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    assert "STRANGER" in ingest.log("ingest")
    await assert_still_serves(ingest, tmp_path, 8)


async def test_wrong_called_ae_is_rejected(ingest, background, tmp_path):
    path = one_instance(tmp_path, 9)
    result = ls.storescu("127.0.0.1", ingest.cfg.ingest.port, "NOTUS", [path], calling_ae=GOOD_AE, extra=["-v"])
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in out and "Called AE Title Not Recognized" in out, out
    await assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    await assert_still_serves(ingest, tmp_path, 10)


async def test_peer_bound_to_another_address_is_rejected(ingest, background, tmp_path):
    path = one_instance(tmp_path, 11)
    refused = ingest.send([path], calling_ae="ELSEWHERE", extra=["-v"])
    out = refused.stdout + refused.stderr
    assert "Calling AE Title Not Recognized" in out, out
    await assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    accepted = ingest.send([path], calling_ae="LOCALONLY", extra=["-v"])
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert pydicom.dcmread(path).SOPInstanceUID in await received_uids(ingest)


async def test_object_over_the_size_limit_is_refused(ingest, background, tmp_path):
    path = one_instance(tmp_path, 12, rows=1024, cols=1024)  # 2 MiB of pixels > MAX_OBJECT
    result = ingest.send([path], calling_ae=GOOD_AE, extra=["-v"])
    out = result.stdout + result.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in out, out
    assoc = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
    try:
        rsp = assoc.send_c_store(pydicom.dcmread(path))
        assert int(rsp.Status) == 0xC002, rsp
    finally:
        assoc.release()
    await assert_nothing_kept(ingest, pydicom.dcmread(path).SOPInstanceUID)
    await assert_still_serves(ingest, tmp_path, 13)


async def test_dataset_uid_differing_from_the_command_is_refused(ingest, background, tmp_path, monkeypatch):
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
    await assert_nothing_kept(ingest, ds.SOPInstanceUID)
    await assert_nothing_kept(ingest, command_uid)
    await assert_still_serves(ingest, tmp_path, 15)


async def test_association_limit_rejects_with_local_limit_exceeded(ingest, background, tmp_path):
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
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert ingest.metric("ingest", "switchyard_ingest_open_associations") == MAX_ASSOCIATIONS
    finally:
        for assoc in held:
            assoc.release()
    await assert_still_serves(ingest, tmp_path, 16)


def test_idle_association_is_aborted_after_the_network_timeout(ingest, background):
    assoc = sender_ae().associate("127.0.0.1", ingest.cfg.ingest.port, ae_title=ingest.cfg.ingest.ae_title)
    assert assoc.is_established
    wait_for(
        lambda: not assoc.is_established,
        timeout=ingest.cfg.ingest.network_timeout_s + 10,
        what="idle association ended by the server",
    )
    assert assoc.is_aborted or assoc.is_released


async def test_object_store_unavailable_answers_out_of_resources(ingest, tmp_path):
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
    await assert_nothing_kept(ingest, uid)
    # The sender retries once the store is back: accepted, announced once.
    again = ingest.send([path], calling_ae=GOOD_AE, extra=["-v"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert sum(e.sop_instance_uid == uid for e in await ingest.received_events()) == 1
    assert len(blob_holding(ingest, uid)) == 1


# ---------------------------------------------------------------- datasets no node will accept (issue #13)

LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element, written by hand (``length`` overrides: the defects)."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", n) + value
    return head + struct.pack("<H", n) + value


def part10(path: Path, sop_class: str, sop_instance: str, transfer_syntax: str, dataset: bytes) -> Path:
    """A Part 10 file holding ``dataset`` exactly as given (pynetdicom sends it unchanged)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + dataset)
    return path


def split(ds: pydicom.Dataset, implicit: bool = False) -> tuple[bytes, bytes]:
    """(every element before Pixel Data, Pixel Data) encoded as ingest receives them."""
    pixels = pydicom.Dataset()
    pixels.PixelData = ds.PixelData
    pixels["PixelData"].VR = "OW"
    del ds.PixelData
    head, pixel_data = encode(ds, implicit, True), encode(pixels, implicit, True)
    assert head is not None and pixel_data is not None
    return head, pixel_data


def poison(case: str, tmp_path: Path, seed: int) -> tuple[Path, str]:
    """(a file with the defect ``case``, the SOP Instance UID its command carries)."""
    ds = pydicom.dcmread(one_instance(tmp_path, seed))
    uid, ts = ds.SOPInstanceUID, ExplicitVRLittleEndian
    if case == "non-UID characters in the SOP Instance UID":
        uid = ds.SOPInstanceUID = f"{uid}.PID{seed}"
    if case == "UID element sent as SQ":
        del ds.StudyInstanceUID
    if case == "1.1 MB tag: event over the bus's max_payload":
        ds.StudyDescription = "S" * (1100 * 1024)
    head, pixels = split(ds, implicit=case == "implicit VR data on an explicit context")
    dataset = {
        "truncated pixel data": head + pixels[:-100],
        "odd value length": head + element(0x00181030, b"LO", b"PROTO01") + pixels,
        "unknown VR": head + element(0x00181030, b"QQ", b"PROTOCOL") + pixels,
        "UID element sent as SQ": head + element(0x0020000D, b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, 0)),
        "implicit VR data on an explicit context": head + pixels,
        "group 0002 element inside the dataset": head + element(0x00020016, b"AE", b"EVILSCU ") + pixels,
        "1.1 MB tag: event over the bus's max_payload": head + pixels,
        "non-UID characters in the SOP Instance UID": head + pixels,
    }[case]
    return part10(tmp_path / "poison.dcm", ds.SOPClassUID, uid, ts, dataset), uid


POISON = {  # case -> what the Error Comment names (never a value)
    "truncated pixel data": "element (7FE0,0010) value length 512 runs past end of dataset",
    "odd value length": "element (0018,1030) has odd value length 7",
    "unknown VR": "element (0018,1030) has unknown VR QQ",
    "UID element sent as SQ": "element (0020,000D) is a sequence, not a UID",
    "implicit VR data on an explicit context": "element (0008,0005): implicit VR data in explicit VR",
    "group 0002 element inside the dataset": "group 0002 element (0002,0016) inside the dataset",
    "1.1 MB tag: event over the bus's max_payload": "received event exceeds the bus's max payload",
    "non-UID characters in the SOP Instance UID": "element (0008,0018) is not a valid UID",
}


def c_store_file(stack: Stack, path: Path, monkeypatch) -> pydicom.Dataset:
    """C-STORE a file's dataset bytes unchanged (pynetdicom, TCP_NODELAY); the response."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=GOOD_AE)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate(
        "127.0.0.1", stack.cfg.ingest.port, ae_title=stack.cfg.ingest.ae_title, evt_handlers=[NODELAY_HANDLER]
    )
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return rsp


@pytest.mark.parametrize("case", list(POISON))
async def test_dataset_no_node_accepts_is_refused_and_leaves_nothing(ingest, background, tmp_path, monkeypatch, case):
    seed = 100 + list(POISON).index(case)
    path, uid = poison(case, tmp_path, seed)
    blobs_before = set(ingest.blob_files())
    events_before = len(await ingest.received_events())
    since = time.monotonic()
    rsp = c_store_file(ingest, path, monkeypatch)
    status = int(rsp.Status)
    # Can never succeed: a 0xC000 failure, not success and not "retry later" (0xA7xx).
    assert status == 0xC000, (case, hex(status), ingest.diagnostics())
    comment = str(rsp.get("ErrorComment", ""))
    assert comment == POISON[case][:64], comment
    # Nothing left behind: no spool file, no blob, no event for it; the log names no value.
    await assert_nothing_kept(ingest, uid)
    background_uids = {pydicom.dcmread(p).SOPInstanceUID for p in background.files}
    for blob in set(ingest.blob_files()) - blobs_before:
        assert any(u.encode() in blob.read_bytes() for u in background_uids), blob
    assert {e.sop_instance_uid for e in (await ingest.received_events())[events_before:]} <= background_uids
    log = ingest.log("ingest")
    assert f"PID{seed}" not in log and "PROTO01" not in log and "S" * 64 not in log
    # The good sender next to it was served as usual meanwhile.
    wait_for(
        lambda: background.slowest_since(since, time.monotonic())[0] >= 2,
        timeout=20,
        what="good stores during and after the bad one",
    )
    count, slowest = background.slowest_since(since, time.monotonic())
    assert slowest < 2.0, (case, count, slowest)
    await assert_still_serves(ingest, tmp_path, seed + 50)


async def test_a_stream_of_poison_does_not_slow_a_good_sender(ingest, background, tmp_path, monkeypatch):
    files = [poison(case, tmp_path / f"p{i}", 200 + i)[0] for i, case in enumerate(POISON)]
    since = time.monotonic()
    for _ in range(2):
        for path in files:
            assert int(c_store_file(ingest, path, monkeypatch).Status) == 0xC000, path
    count, slowest = background.slowest_since(since, time.monotonic())
    assert count >= 5 and slowest < 2.0, (count, slowest)


async def test_metrics_account_for_every_answer(ingest):
    # After all cases above (rejections, aborts, drops) the gauge is back to what is open.
    wait_for(
        lambda: ingest.metric("ingest", "switchyard_ingest_open_associations") == 0,
        timeout=20,
        what="open associations back to 0",
    )
    m = lambda name, labels="": ingest.metric("ingest", name, labels) or 0.0  # noqa: E731
    assert m("switchyard_ingest_associations_rejected_total") >= 5  # calling AE x2, called AE, address, limit
    assert m("switchyard_ingest_associations_aborted_total") >= 2
    for status in ("0x0000", "0xC000", "0xC001", "0xC002", "0xA700"):
        assert m("switchyard_ingest_cstore_status_total", f'status="{status}"') >= 1, status
    accepted = m("switchyard_ingest_instances_total")
    assert accepted == len(await ingest.received_events())
    assert m("switchyard_ingest_bytes_total") == sum(e.size for e in await ingest.received_events())
    assert m("switchyard_ingest_receive_to_ack_seconds_count") == sum(
        m("switchyard_ingest_cstore_status_total", f'status="{s}"')
        for s in ("0x0000", "0xC000", "0xC001", "0xC002", "0xA700")
    )
