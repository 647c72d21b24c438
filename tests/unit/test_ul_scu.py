"""The asyncio SCU (shared.ul.connection, the forwarder's NodeSender) against real peers on loopback sockets.

Peers: pynetdicom's own Storage SCP, and a scriptable SCP made of
shared.ul.codec (to send what pynetdicom will not: a small max PDU, wrong
message ids, an A-ABORT mid-store, an idle close).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from services.forwarder.sender import NodeSender
from shared import ul
from shared.config import NodeConfig
from shared.dicomfile import dataset_offset

TIMEOUT = 10.0


def ct_file(tmp_path: Path, size: int = 10000) -> tuple[Path, str, bytes]:
    """A CT instance on disk (explicit VR little endian); its SOP Instance UID and its dataset bytes."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (size // 256)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as f:
        f.seek(dataset_offset(f))
        return path, ds.SOPInstanceUID, f.read()


async def until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)


async def store(assoc: ul.Association, path: Path, sop: str) -> int:
    with open(path, "rb") as f:
        start = dataset_offset(f)
        size = f.seek(0, 2) - start
        f.seek(start)
        return await assoc.c_store(
            assoc.accepted[(CTImageStorage, ExplicitVRLittleEndian)], CTImageStorage, sop, f, size
        )


class CodecPeer:
    """A Storage SCP made of shared.ul.codec, one behaviour per test.

    ``mode``: "answer" (status ``status``), "wrong_id" (answers another message
    id), "abort" (A-ABORT on the C-STORE command), "close_after_store" (answers,
    then closes the idle connection), "reject" (A-ASSOCIATE-RJ, called AE).
    """

    def __init__(self, max_pdu: int = 1024, status: int = 0x0000, mode: str = "answer") -> None:
        self.max_pdu, self.status, self.mode = max_pdu, status, mode
        self.contexts = [
            build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
            build_context(Verification),
        ]
        self.associations = 0
        self.p_data: list[bytes] = []  # every P-DATA-TF PDU received, whole
        self.datasets: list[bytes] = []
        self.released = 0

    async def __aenter__(self) -> CodecPeer:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, data = await ul.read_pdu(reader, ul.MAX_ASSOCIATE_RQ)
        refuse = ul.REJECT_CALLED_AE if self.mode == "reject" else None
        assoc = ul.negotiate(ul.decode_request(data), 1, self.contexts, self.max_pdu, refuse)
        writer.write(assoc.answer)
        if assoc.reject is not None:
            return
        self.associations += 1
        command, dataset, fields = bytearray(), bytearray(), {}
        while True:
            pdu_type, data = await ul.read_pdu(reader, ul.HARD_PDU_CAP)
            if pdu_type == ul.RELEASE_RQ:
                self.released += 1
                writer.write(ul.RELEASE_RP_PDU)
                return
            if pdu_type != ul.P_DATA_TF:
                return
            self.p_data.append(data)
            for cx, is_command, last, fragment in ul.pdvs(data):
                if is_command:
                    command += fragment
                    if not last:
                        continue
                    fields = ul.parse_command(bytes(command))
                    command.clear()
                    if self.mode == "abort":
                        writer.write(ul.abort_pdu())
                        return
                    if ul.command_us(fields, ul.COMMAND_FIELD) == ul.C_ECHO_RQ:
                        self._answer(writer, assoc, cx, fields, ul.C_ECHO_RSP, None)
                    continue
                dataset += fragment
                if last:
                    self.datasets.append(bytes(dataset))
                    dataset.clear()
                    self._answer(
                        writer, assoc, cx, fields, ul.C_STORE_RSP, ul.command_uid(fields, ul.AFFECTED_SOP_INSTANCE)
                    )
                    if self.mode == "close_after_store":
                        return

    def _answer(self, writer, assoc, cx, fields, field, instance) -> None:
        message_id = ul.command_us(fields, ul.MESSAGE_ID)
        assert message_id is not None
        message_id += 1 if self.mode == "wrong_id" else 0
        rsp = ul.response(field, message_id, ul.command_uid(fields, ul.AFFECTED_SOP_CLASS), instance, self.status)
        writer.write(ul.p_data_command(cx, rsp, assoc.peer_max_pdu))


def node(port: int) -> NodeConfig:
    return NodeConfig(id="peer", host="127.0.0.1", dicom_port=port, ae_title="PEER")


def request(port: int, contexts=None, max_pdu: int = 65536):
    contexts = contexts or [(CTImageStorage, ExplicitVRLittleEndian)]
    return ul.Association.request("127.0.0.1", port, "FORWARDER", "PEER", contexts, max_pdu, TIMEOUT)


# ------------------------------------------------------------ against pynetdicom


@pytest.fixture
def pynetdicom_scp():
    """pynetdicom's Storage SCP (max PDU 4096), recording what it received."""
    received: list[tuple[str, bytes]] = []
    released: list[bool] = []

    def on_store(event):
        received.append((str(event.request.AffectedSOPInstanceUID), event.request.DataSet.getvalue()))
        return 0x0000

    ae = AE(ae_title="PEER")
    ae.maximum_pdu_size = 4096
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_RELEASED, lambda event: released.append(True))],
    )
    assert server is not None
    try:
        yield server.server_address[1], received, released
    finally:
        server.shutdown()


async def test_negotiates_stores_and_releases_with_pynetdicom(pynetdicom_scp, tmp_path):
    port, received, released = pynetdicom_scp
    path, sop, data = ct_file(tmp_path, 20000)
    proposed = [
        (CTImageStorage, ExplicitVRLittleEndian),
        (MRImageStorage, ExplicitVRLittleEndian),
        (CTImageStorage, ImplicitVRLittleEndian),
    ]
    assoc = await request(port, proposed)
    assert assoc.accepted == {(CTImageStorage, ExplicitVRLittleEndian): 1}
    assert assoc.peer_max_pdu == 4096
    assert await store(assoc, path, sop) == 0x0000
    assert await store(assoc, path, sop) == 0x0000  # the same association, the next message id
    assert received == [(sop, data), (sop, data)]
    await assoc.close()
    await until(lambda: released, what="pynetdicom saw the release")


async def test_echo_against_pynetdicom_and_a_closed_port(pynetdicom_scp):
    port, _, _ = pynetdicom_scp
    assert await ul.echo("127.0.0.1", port, "PROBE", "PEER", TIMEOUT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: refused
        assert not await ul.echo("127.0.0.1", closed, "PROBE", "PEER", TIMEOUT)
        with pytest.raises(ul.Unreachable):
            await request(closed)


# ------------------------------------------------------------ against the codec peer


async def test_c_store_is_fragmented_at_the_peers_max_pdu(tmp_path):
    path, sop, data = ct_file(tmp_path, 10000)
    async with CodecPeer(max_pdu=1024) as peer:
        assoc = await request(peer.port)
        assert assoc.peer_max_pdu == 1024
        assert await store(assoc, path, sop) == 0x0000
        await assoc.close()
    assert peer.datasets == [data] and peer.released == 1
    assert all(len(pdu) - 6 <= 1024 for pdu in peer.p_data)
    items = [(is_command, last, len(f)) for pdu in peer.p_data for _, is_command, last, f in ul.pdvs(pdu)]
    dataset_items = [(last, n) for is_command, last, n in items if not is_command]
    # Every fragment but the last fills the PDU (6 bytes of PDV item header); only the last says so.
    assert all(n == 1024 - 6 and not last for last, n in dataset_items[:-1])
    assert dataset_items[-1][0] and len(dataset_items) == -(-len(data) // (1024 - 6))


@pytest.mark.parametrize(
    "status,ok,permanent",
    [
        (0x0000, True, False),
        (0xB000, True, False),
        (0xA700, False, False),
        (0xC000, False, True),
        (0x0122, False, True),
    ],
)
async def test_the_response_status_decides_the_outcome(tmp_path, status, ok, permanent):
    path, sop, _ = ct_file(tmp_path)
    async with CodecPeer(status=status) as peer:
        sender = NodeSender(node(peer.port), "FORWARDER", TIMEOUT)
        try:
            outcome = await sender.send(path, CTImageStorage, sop, ExplicitVRLittleEndian)
        finally:
            await sender.close()
    assert (outcome.ok, outcome.permanent, outcome.status) == (ok, permanent, status)


async def test_a_response_to_another_message_is_a_protocol_error(tmp_path):
    path, sop, _ = ct_file(tmp_path)
    async with CodecPeer(mode="wrong_id") as peer:
        assoc = await request(peer.port)
        with pytest.raises(ul.ProtocolError):
            await store(assoc, path, sop)
        await assoc.close(abort=True)
        sender = NodeSender(node(peer.port), "FORWARDER", TIMEOUT)
        outcome = await sender.send(path, CTImageStorage, sop, ExplicitVRLittleEndian)
        assert (outcome.ok, outcome.permanent) == (False, False)
        assert outcome.reason == "node aborted the C-STORE (ProtocolError)"
        assert outcome.instance and not outcome.node_failure  # this instance's failure, found at once
        assert sender.assoc is None  # aborted: the next send associates afresh


async def test_a_peer_abort_fails_the_store_and_drops_the_association(tmp_path):
    path, sop, _ = ct_file(tmp_path)
    async with CodecPeer(mode="abort") as peer:
        assoc = await request(peer.port)
        with pytest.raises(ConnectionResetError):
            await store(assoc, path, sop)
        await assoc.close(abort=True)
        sender = NodeSender(node(peer.port), "FORWARDER", TIMEOUT)
        started = time.monotonic()
        outcome = await sender.send(path, CTImageStorage, sop, ExplicitVRLittleEndian)
        # Recognised when the A-ABORT arrives, not after the response timeout.
        assert time.monotonic() - started < TIMEOUT / 2
        assert (outcome.ok, outcome.permanent) == (False, False)
        assert outcome.reason == "node aborted the C-STORE (ConnectionResetError)" and sender.assoc is None
        assert outcome.instance and not outcome.node_failure


async def test_an_association_the_peer_closed_while_idle_is_renewed(tmp_path):
    path, sop, data = ct_file(tmp_path)
    async with CodecPeer(mode="close_after_store") as peer:
        sender = NodeSender(node(peer.port), "FORWARDER", TIMEOUT)
        try:
            assert (await sender.send(path, CTImageStorage, sop, ExplicitVRLittleEndian)).ok
            first = sender.assoc
            assert first is not None
            await until(lambda: not first.usable, what="EOF seen on the idle association")
            assert (await sender.send(path, CTImageStorage, sop, ExplicitVRLittleEndian)).ok
            assert sender.assoc is not first
        finally:
            await sender.close()
    assert peer.associations == 2 and peer.datasets == [data, data]


async def test_a_rejection_names_result_source_and_reason(tmp_path):
    path, sop, _ = ct_file(tmp_path)
    async with CodecPeer(mode="reject") as peer:
        with pytest.raises(ul.Rejected) as rejected:
            await request(peer.port)
        assert (rejected.value.result, rejected.value.source, rejected.value.reason) == ul.REJECT_CALLED_AE
        outcome = await NodeSender(node(peer.port), "FORWARDER", TIMEOUT).send(
            path, CTImageStorage, sop, ExplicitVRLittleEndian
        )
        assert outcome.reason == "association rejected (result 1, source 1, reason 7)" and not outcome.permanent
        assert outcome.node_failure and not outcome.instance  # the node's failure: pause it, use no delivery
        assert not await ul.echo("127.0.0.1", peer.port, "PROBE", "PEER", TIMEOUT)


async def test_a_context_the_peer_refused_is_a_permanent_failure(tmp_path):
    path, sop, _ = ct_file(tmp_path)
    async with CodecPeer() as peer:
        sender = NodeSender(node(peer.port), "FORWARDER", TIMEOUT)
        try:
            outcome = await sender.send(path, MRImageStorage, sop, ExplicitVRLittleEndian)
            assert (outcome.ok, outcome.permanent) == (False, True)
            # A context the association lacks: renewed with both proposed, and the CT one accepted.
            assert (await sender.send(path, CTImageStorage, sop, ExplicitVRLittleEndian)).ok
            assert sender.proposed == [
                (MRImageStorage, ExplicitVRLittleEndian),
                (CTImageStorage, ExplicitVRLittleEndian),
            ]
        finally:
            await sender.close()
    assert peer.associations == 2


async def test_echo_against_the_codec_peer():
    async with CodecPeer() as peer:
        assert await ul.echo("127.0.0.1", peer.port, "PROBE", "PEER", TIMEOUT)
        peer.status = 0x0110
        assert not await ul.echo("127.0.0.1", peer.port, "PROBE", "PEER", TIMEOUT)
    assert peer.released == 2  # a failed echo releases too
