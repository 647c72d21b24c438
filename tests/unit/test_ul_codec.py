"""shared.ul.codec byte for byte: fixed vectors, and pynetdicom's encoders and decoders both ways."""

from __future__ import annotations

import io

import pytest
from pynetdicom import dimse_messages, dimse_primitives
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    A_P_ABORT,
    P_DATA,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from shared.ul import codec

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
INSTANCE = "1.2.3.4.5"  # odd length: padded with a NUL


def pynetdicom_p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF as pynetdicom encodes it: (context id, message control header, fragment) per PDV."""
    prim = P_DATA()
    # pynetdicom checks for [id, pdv] lists at run time; its annotation says tuples
    prim.presentation_data_value_list = [[cx, bytes([control]) + data] for cx, control, data in pdvs]  # type: ignore[misc]
    pdu = P_DATA_TF()
    pdu.from_primitive(prim)
    return pdu.encode()


def pynetdicom_command(message: dimse_messages.DIMSEMessage, primitive) -> bytes:
    """The command set pynetdicom sends for a primitive (the first P-DATA's command fragment)."""
    message.primitive_to_message(primitive)
    first = next(message.encode_msg(1, 0))
    return first.presentation_data_value_list[0][1][1:]


def split_pdus(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        out.append(data[pos : pos + 6 + int.from_bytes(data[pos + 2 : pos + 6], "big")])
        pos += len(out[-1])
    return out


# ------------------------------------------------------------ fixed vectors


def test_fixed_pdus():
    assert codec.RELEASE_RQ_PDU == bytes.fromhex("05 00 00000004 00000000")
    assert codec.RELEASE_RP_PDU == bytes.fromhex("06 00 00000004 00000000")
    assert codec.abort_pdu(codec.ABORT_INVALID_PARAMETER) == bytes.fromhex("07 00 00000004 0000 02 06")
    assert codec.reject_pdu(*codec.REJECT_CALLED_AE) == bytes.fromhex("03 00 00000004 00 01 01 07")
    assert codec.decode_reject(bytes.fromhex("03 00 00000004 00 02 03 02")) == codec.REJECT_LOCAL_LIMIT


def test_fixed_p_data_vectors():
    # PDU type 4, length 8; PDV item length 4, context 3, control 0x02 (dataset, last), 2 bytes.
    assert codec.p_data_dataset(3, b"ab", last=True) == bytes.fromhex("04 00 00000008 00000004 03 02 6162")
    assert codec.p_data_dataset(3, b"ab", last=False) == bytes.fromhex("04 00 00000008 00000004 03 00 6162")
    # A command of 5 bytes in PDUs of at most 9 bytes (3 bytes of fragment each): control 0x01 then 0x03.
    assert codec.p_data_command(1, b"12345", 9) == bytes.fromhex(
        "04 00 00000009 00000005 01 01 31323304 00 00000008 00000004 01 03 3435"
    )
    items = list(codec.pdvs(bytes.fromhex("04 00 00000010 00000004 05 01 6869 00000004 05 03 6a6b")))
    assert [(cx, is_command, last, bytes(f)) for cx, is_command, last, f in items] == [
        (5, True, False, b"hi"),
        (5, True, True, b"jk"),
    ]


def test_fixed_echo_request():
    # Group length 56; (0000,0002) "1.2.840.10008.1.1" + NUL; (0000,0100) 0x0030; (0000,0110) 1; (0000,0800) 0x0101.
    assert codec.echo_request(1) == bytes.fromhex(
        "0000 0000 04000000 38000000"
        "0000 0200 12000000" + b"1.2.840.10008.1.1\x00".hex() + "0000 0001 02000000 3000"
        "0000 1001 02000000 0100"
        "0000 0008 02000000 0101"
    )


def test_fixed_command_set_decodes():
    fields = codec.parse_command(
        bytes.fromhex(
            "0000 0001 02000000 01800000 2001 02000000 09000000 0009 02000000 00a70000 0010 06000000 312e322e3300"
        )
    )
    assert codec.command_us(fields, codec.COMMAND_FIELD) == codec.C_STORE_RSP
    assert codec.command_us(fields, codec.MESSAGE_ID_RESPONDED) == 9
    assert codec.command_us(fields, codec.STATUS) == 0xA700
    assert codec.command_uid(fields, codec.AFFECTED_SOP_INSTANCE) == "1.2.3"
    assert codec.command_us(fields, codec.PRIORITY) is None


# ------------------------------------------------------------ ours == pynetdicom's encoding


def test_release_pdus_are_pynetdicoms():
    assert codec.RELEASE_RQ_PDU == A_RELEASE_RQ().encode()
    assert codec.RELEASE_RP_PDU == A_RELEASE_RP().encode()
    rq, rp = A_RELEASE_RQ(), A_RELEASE_RP()
    rq.decode(codec.RELEASE_RQ_PDU)
    rp.decode(codec.RELEASE_RP_PDU)
    assert (rq.pdu_type, rp.pdu_type) == (codec.RELEASE_RQ, codec.RELEASE_RP)


@pytest.mark.parametrize(
    "reason",
    [
        0,
        codec.ABORT_UNRECOGNISED_PDU,
        codec.ABORT_UNEXPECTED_PDU,
        codec.ABORT_UNEXPECTED_PARAMETER,
        codec.ABORT_INVALID_PARAMETER,
    ],
)
def test_abort_is_pynetdicoms_provider_abort(reason):
    prim = A_P_ABORT()
    prim.provider_reason = reason
    pdu = A_ABORT_RQ()
    pdu.from_primitive(prim)
    assert codec.abort_pdu(reason) == pdu.encode()
    decoded = A_ABORT_RQ()
    decoded.decode(codec.abort_pdu(reason))
    assert (decoded.source, decoded.reason_diagnostic) == (0x02, reason)


@pytest.mark.parametrize(
    "reject",
    [
        codec.REJECT_APPLICATION_CONTEXT,
        codec.REJECT_CALLING_AE,
        codec.REJECT_CALLED_AE,
        codec.REJECT_PROTOCOL_VERSION,
        codec.REJECT_LOCAL_LIMIT,
    ],
)
def test_reject_is_pynetdicoms(reject):
    prim = A_ASSOCIATE()
    prim.result, prim.result_source, prim.diagnostic = reject
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(prim)
    assert codec.reject_pdu(*reject) == pdu.encode()
    assert codec.decode_reject(pdu.encode()) == reject


def test_truncated_reject_is_a_protocol_error():
    with pytest.raises(codec.ProtocolError):
        codec.decode_reject(bytes.fromhex("03 00 00000000"))


@pytest.mark.parametrize("size,last", [(1, True), (2, False), (16378, True), (0, True)])
def test_dataset_p_data_is_pynetdicoms(size, last):
    fragment = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ours = codec.p_data_dataset(7, fragment, last)
    assert ours == pynetdicom_p_data([(7, 0x02 if last else 0x00, fragment)])
    assert [(cx, c, lst, bytes(f)) for cx, c, lst, f in codec.pdvs(ours)] == [(7, False, last, fragment)]


@pytest.mark.parametrize("max_pdu", [0, 8, 64, 16384])
def test_command_p_data_is_pynetdicoms_fragmentation(max_pdu):
    command = codec.store_request(3, CT, INSTANCE)
    ours = codec.p_data_command(1, command, max_pdu)
    room = max_pdu - 6 if max_pdu else len(command)
    pieces = [command[i : i + room] for i in range(0, len(command), room)]
    expected = b"".join(
        pynetdicom_p_data([(1, 0x03 if i == len(pieces) - 1 else 0x01, p)]) for i, p in enumerate(pieces)
    )
    assert ours == expected
    assert all(len(pdu) - 6 <= max_pdu for pdu in split_pdus(ours)) or not max_pdu


def test_pdvs_decodes_pynetdicoms_multi_item_p_data():
    pdu = pynetdicom_p_data([(1, 0x01, b"cmd-"), (1, 0x03, b"end"), (3, 0x00, b"data"), (3, 0x02, b"!")])
    assert [(cx, c, lst, bytes(f)) for cx, c, lst, f in codec.pdvs(pdu)] == [
        (1, True, False, b"cmd-"),
        (1, True, True, b"end"),
        (3, False, False, b"data"),
        (3, False, True, b"!"),
    ]
    decoded = P_DATA_TF()
    decoded.decode(codec.p_data_command(1, b"cmd-end", 0))
    assert decoded.presentation_data_value_items[0].presentation_data_value == b"\x03cmd-end"


@pytest.mark.parametrize("priority", [0, 1, 2])
def test_store_request_is_pynetdicoms(priority):
    prim = dimse_primitives.C_STORE()
    prim.MessageID, prim.Priority = 0xFFFF, priority
    prim.AffectedSOPClassUID, prim.AffectedSOPInstanceUID = CT, INSTANCE
    prim.DataSet = io.BytesIO(b"\x00\x00")
    expected = pynetdicom_command(dimse_messages.C_STORE_RQ(), prim)
    ours = codec.store_request(0xFFFF, CT, INSTANCE, priority)
    assert ours == expected
    rq = decode(io.BytesIO(ours), True, True)
    assert (rq.CommandField, rq.MessageID, rq.Priority, rq.CommandDataSetType) == (0x0001, 0xFFFF, priority, 1)
    assert (rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID) == (CT, INSTANCE)


@pytest.mark.parametrize(
    "status,comment", [(0x0000, ""), (0xB000, ""), (0xA700, "object store unavailable"), (0xC001, "odd")]
)
def test_store_response_is_pynetdicoms(status, comment):
    prim = dimse_primitives.C_STORE()
    prim.MessageIDBeingRespondedTo, prim.Status = 12, status
    prim.AffectedSOPClassUID, prim.AffectedSOPInstanceUID = CT, INSTANCE
    if comment:
        prim.ErrorComment = comment
    expected = pynetdicom_command(dimse_messages.C_STORE_RSP(), prim)
    assert codec.response(codec.C_STORE_RSP, 12, CT, INSTANCE, status, comment) == expected


def test_echo_is_pynetdicoms():
    rq = dimse_primitives.C_ECHO()
    rq.MessageID = 1
    rq.AffectedSOPClassUID = codec.VERIFICATION
    assert codec.echo_request(1) == pynetdicom_command(dimse_messages.C_ECHO_RQ(), rq)
    rsp = dimse_primitives.C_ECHO()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0
    rsp.AffectedSOPClassUID = codec.VERIFICATION
    assert codec.response(codec.C_ECHO_RSP, 1, codec.VERIFICATION, None, 0) == pynetdicom_command(
        dimse_messages.C_ECHO_RSP(), rsp
    )


def test_parse_command_reads_pynetdicoms_response():
    prim = dimse_primitives.C_STORE()
    prim.MessageIDBeingRespondedTo, prim.Status = 4, 0xB007
    prim.AffectedSOPClassUID, prim.AffectedSOPInstanceUID = CT, INSTANCE
    fields = codec.parse_command(pynetdicom_command(dimse_messages.C_STORE_RSP(), prim))
    assert codec.command_us(fields, codec.COMMAND_FIELD) == codec.C_STORE_RSP
    assert codec.command_us(fields, codec.MESSAGE_ID_RESPONDED) == 4
    assert codec.command_us(fields, codec.STATUS) == 0xB007
    assert codec.command_uid(fields, codec.AFFECTED_SOP_INSTANCE) == INSTANCE
    assert codec.command_us(fields, codec.DATASET_TYPE) == codec.NO_DATASET


# ------------------------------------------------------------ association (requestor side)


def test_associate_request_decodes_in_pynetdicom():
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    data = codec.associate_request(
        "FORWARDER", "NODE1", [(CT, EXPLICIT), (codec.VERIFICATION, "1.2.840.10008.1.2")], 65536
    )
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    rq = pdu.to_primitive()
    assert (rq.calling_ae_title, rq.called_ae_title) == ("FORWARDER", "NODE1")
    assert rq.maximum_length_received == 65536
    assert [
        (cx.context_id, cx.abstract_syntax, cx.transfer_syntax) for cx in rq.presentation_context_definition_list
    ] == [(1, CT, [EXPLICIT]), (3, codec.VERIFICATION, ["1.2.840.10008.1.2"])]


def test_decode_accept_keeps_only_what_was_accepted_as_proposed():
    proposed = [(CT, EXPLICIT), ("1.2.3.4", EXPLICIT), (codec.VERIFICATION, "1.2.840.10008.1.2")]
    results = []
    for cx_id, result, ts in [(1, 0, EXPLICIT), (3, 3, EXPLICIT), (5, 0, "1.2.840.10008.1.2.2")]:
        cx = PresentationContext()
        cx.context_id, cx.result, cx.transfer_syntax = cx_id, result, [ts]
        results.append(cx)
    ac = A_ASSOCIATE()
    ac.application_context_name = codec.APPLICATION_CONTEXT
    ac.calling_ae_title, ac.called_ae_title = "FORWARDER", "NODE1"
    ac.result, ac.result_source = 0, 1
    ac.presentation_context_definition_results_list = results
    length = MaximumLengthNotification()
    length.maximum_length_received = 32768
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.3"
    ac.user_information = [length, impl]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    # Context 5 was accepted with a transfer syntax we did not propose: not usable.
    assert codec.decode_accept(pdu.encode(), proposed) == ({(CT, EXPLICIT): 1}, 32768)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("02 00 00000010") + bytes(16),  # pynetdicom decodes this as "nothing accepted"
        bytes.fromhex("02 00 00000044") + bytes(4) + b"X" * 64,
        bytes.fromhex("02 00 00000040") + bytes(16),  # shorter than its header says
    ],
)
def test_a_garbled_accept_is_a_protocol_error_not_a_refusal(data):
    with pytest.raises(codec.ProtocolError):
        codec.decode_accept(data, [(CT, EXPLICIT)])
