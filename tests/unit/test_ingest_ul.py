"""The Storage SCP's upper layer against pynetdicom's own encoders and decoders."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from services.ingest.scp import _Incoming, supported_contexts
from shared import ul


def store_pdus(max_pdu: int, size: int = 20000) -> tuple[list[bytes], bytes, str]:
    ds = pydicom.Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.BitsAllocated = 8
    ds.PixelData = bytes(range(256)) * (size // 256)
    prim = C_STORE()
    prim.MessageID = 9
    prim.AffectedSOPClassUID = CTImageStorage
    prim.AffectedSOPInstanceUID = ds.SOPInstanceUID
    prim.Priority = 2
    data = encode(ds, False, True)
    assert data is not None
    prim.DataSet = io.BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdus = []
    for p_data in msg.encode_msg(3, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(pdu.encode())
    return pdus, data, ds.SOPInstanceUID


def test_pdvs_and_command_of_a_fragmented_c_store():
    pdus, data, uid = store_pdus(4096)
    assert len(pdus) > 4
    command, dataset = bytearray(), bytearray()
    for pdu in pdus:
        for cx, is_command, _last, fragment in ul.pdvs(pdu):
            assert cx == 3
            (command if is_command else dataset).extend(fragment)
    assert bytes(dataset) == data
    fields = ul.parse_command(bytes(command))
    assert ul.command_us(fields, ul.COMMAND_FIELD) == ul.C_STORE_RQ
    assert ul.command_us(fields, ul.MESSAGE_ID) == 9
    assert ul.command_uid(fields, ul.AFFECTED_SOP_INSTANCE) == uid
    assert ul.command_uid(fields, ul.AFFECTED_SOP_CLASS) == CTImageStorage


@pytest.mark.parametrize(
    "pdu",
    [
        b"\x04\x00\x00\x00\x00\x00",  # no PDV item
        b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x10\x01\x03\x00\x00",  # item longer than the PDU
        b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x01\x01\x03",  # item too short for its header
    ],
)
def test_malformed_p_data_is_a_protocol_error(pdu):
    with pytest.raises(ul.ProtocolError):
        list(ul.pdvs(pdu))


def test_malformed_command_set_is_a_protocol_error():
    with pytest.raises(ul.ProtocolError):
        ul.parse_command(b"\x00\x00\x00\x01\x10\x00\x00\x00\x01")  # length beyond the data
    with pytest.raises(ul.ProtocolError):
        ul.parse_command(b"\x08\x00\x18\x00\x00\x00\x00\x00")  # not group 0000


def test_response_decodes_as_a_c_store_rsp_and_fits_a_small_peer_pdu():
    uid = generate_uid()
    command = ul.response(ul.C_STORE_RSP, 9, CTImageStorage, uid, 0xA700, "object store unavailable")
    rsp = decode(io.BytesIO(command), True, True)
    assert rsp.CommandField == ul.C_STORE_RSP
    assert rsp.MessageIDBeingRespondedTo == 9
    assert rsp.Status == 0xA700
    assert rsp.AffectedSOPInstanceUID == uid
    assert rsp.ErrorComment == "object store unavailable"
    assert rsp.CommandGroupLength == len(command) - 12
    framed = ul.p_data_command(5, command, 64)
    pdus, pos = [], 0
    while pos < len(framed):
        length = int.from_bytes(framed[pos + 2 : pos + 6], "big")
        pdus.append(framed[pos : pos + 6 + length])
        pos += 6 + length
    assert len(pdus) > 1 and all(len(p) - 6 <= 64 for p in pdus)
    parts = [(cx, is_command, last, bytes(f)) for p in pdus for cx, is_command, last, f in ul.pdvs(p)]
    assert all(cx == 5 and is_command for cx, is_command, _, _ in parts)
    assert [last for *_, last, _ in parts] == [False] * (len(parts) - 1) + [True]
    assert b"".join(f for *_, f in parts) == command


def associate_rq(calling: str = "MODALITY", called: str = "SWITCHYARD") -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = ul.APPLICATION_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cxs = [
        build_context(CTImageStorage, [ExplicitVRLittleEndian]),
        build_context("1.2.3.4.5", [ImplicitVRLittleEndian]),
    ]
    for i, cx in enumerate(cxs):
        cx.context_id = 2 * i + 1
    prim.presentation_context_definition_list = cxs
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    prim.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def test_negotiation_accepts_storage_and_refuses_unknown_abstract_syntaxes():
    data = associate_rq()
    rq = ul.decode_request(data)
    result = ul.negotiate(rq, int.from_bytes(data[6:8], "big"), supported_contexts(), 65536, None)
    assert result.reject is None
    assert result.contexts == {1: (CTImageStorage, ExplicitVRLittleEndian)}
    assert result.peer_max_pdu == 16384
    ac = A_ASSOCIATE_AC()
    ac.decode(result.answer)
    prim = ac.to_primitive()
    assert prim.maximum_length_received == 65536
    assert {cx.context_id: cx.result for cx in prim.presentation_context_definition_results_list} == {1: 0, 3: 3}


def test_negotiation_rejects_with_the_reason_given():
    data = associate_rq(calling="STRANGER")
    result = ul.negotiate(ul.decode_request(data), 1, supported_contexts(), 65536, ul.REJECT_CALLING_AE)
    assert result.reject == ul.REJECT_CALLING_AE
    assert result.answer == bytes([ul.ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 3])
    assert (
        ul.negotiate(ul.decode_request(data), 2, supported_contexts(), 65536, None).reject == ul.REJECT_PROTOCOL_VERSION
    )


def test_garbage_association_request_is_a_protocol_error():
    with pytest.raises(ul.ProtocolError):
        ul.decode_request(b"\x01\x00\x00\x00\x00\x10" + bytes(16))


def test_incoming_stops_spooling_at_the_size_limit(tmp_path):
    incoming = _Incoming(tmp_path / "x.dcm", b"M" * 10, limit=100)
    incoming.write(memoryview(b"a" * 60))
    assert (tmp_path / "x.dcm").exists() and not incoming.too_large
    incoming.write(memoryview(b"b" * 60))
    assert incoming.too_large and not (tmp_path / "x.dcm").exists()
    incoming.write(memoryview(b"c" * 60))  # the rest of the object is read and dropped
    assert incoming.size == 190 and not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", generate_uid()])
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
def test_file_meta_is_what_pydicom_writes(sop_instance, transfer_syntax):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta

    expected = DicomBytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=UID(MRImageStorage), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)
        ),
    )
    assert ul.file_meta(MRImageStorage, sop_instance, transfer_syntax) == expected.getvalue()
