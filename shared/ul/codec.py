"""The DICOM upper layer's bytes (PS3.8, PS3.7 command sets): PDUs in and out, no I/O.

Everything here maps bytes to values or values to bytes, so it is tested with
byte vectors against pynetdicom's own encoders (tests/unit/test_ul_codec.py).
The A-ASSOCIATE-RQ/AC codec and the presentation-context negotiation are
pynetdicom's (public API: pynetdicom.pdu, pynetdicom.presentation); this
module adds P-DATA-TF framing, PDV items, the few command sets Switchyard
speaks (C-STORE, C-ECHO) and the small fixed PDUs (release, abort, reject).
Reading PDUs off a stream is the drivers' job (shared.ul.connection).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

__all__ = [
    "ABORT",
    "ABORT_INVALID_PARAMETER",
    "ABORT_UNEXPECTED_PARAMETER",
    "ABORT_UNEXPECTED_PDU",
    "ABORT_UNRECOGNISED_PDU",
    "AFFECTED_SOP_CLASS",
    "AFFECTED_SOP_INSTANCE",
    "APPLICATION_CONTEXT",
    "ASSOCIATE_AC",
    "ASSOCIATE_RJ",
    "ASSOCIATE_RQ",
    "COMMAND_FIELD",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "DATASET_TYPE",
    "ERROR_COMMENT",
    "HARD_PDU_CAP",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "MAX_ASSOCIATE_RQ",
    "MESSAGE_ID",
    "MESSAGE_ID_RESPONDED",
    "NO_DATASET",
    "Negotiated",
    "PRIORITY",
    "P_DATA_TF",
    "ProtocolError",
    "REJECT_APPLICATION_CONTEXT",
    "REJECT_CALLED_AE",
    "REJECT_CALLING_AE",
    "REJECT_LOCAL_LIMIT",
    "REJECT_PROTOCOL_VERSION",
    "RELEASE_RP",
    "RELEASE_RP_PDU",
    "RELEASE_RQ",
    "RELEASE_RQ_PDU",
    "STATUS",
    "VERIFICATION",
    "abort_pdu",
    "associate_request",
    "command_uid",
    "command_us",
    "decode_accept",
    "decode_reject",
    "decode_request",
    "echo_request",
    "file_meta",
    "negotiate",
    "p_data_command",
    "p_data_dataset",
    "parse_command",
    "pdvs",
    "reject_pdu",
    "response",
    "store_request",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)

# A-ABORT source 2 (service provider) reasons, PS3.8 9.3.8.
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

# An A-ASSOCIATE-RQ proposing every storage class with every transfer syntax
# is well under this; a larger one is not an association request.
MAX_ASSOCIATE_RQ = 1024 * 1024
# A peer may announce "no limit" (0); PDUs over this are refused anyway.
HARD_PDU_CAP = 64 * 1024 * 1024

# Command Field values (PS3.7 9.3 and 9.1.5).
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101

# Command set element numbers (group 0000).
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED = 0x0120
PRIORITY = 0x0700
DATASET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000


class ProtocolError(Exception):
    """The peer broke PS3.8: the association ends with an A-ABORT carrying ``reason``."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def pdvs(pdu: bytes) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """(context id, is command, is last fragment, fragment) for each PDV item of a P-DATA-TF."""
    view = memoryview(pdu)
    pos, end = 6, len(pdu)
    if pos == end:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF without PDV items")
    while pos < end:
        if end - pos < 6:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "truncated PDV item")
        item_length = int.from_bytes(view[pos : pos + 4], "big")
        if item_length < 2 or pos + 4 + item_length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "PDV item length out of bounds")
        control = view[pos + 5]
        yield view[pos + 4], bool(control & 0x01), bool(control & 0x02), view[pos + 6 : pos + 4 + item_length]
        pos += 4 + item_length


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (group 0000, implicit VR little endian) as element number -> raw value."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "truncated command element")
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "malformed command set")
        out[element] = bytes(data[pos : pos + length])
        pos += length
    return out


def command_us(command: dict[int, bytes], element: int) -> int | None:
    value = command.get(element)
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def command_uid(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def response(
    command_field: int, message_id: int, sop_class: str, sop_instance: str | None, status: int, comment: str = ""
) -> bytes:
    """The command set of a response (no dataset), encoded implicit VR little endian."""
    elements: list[tuple[int, bytes]] = [
        (AFFECTED_SOP_CLASS, _even(sop_class.encode("ascii", "replace"), b"\x00")),
        (COMMAND_FIELD, struct.pack("<H", command_field)),
        (MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)),
        (DATASET_TYPE, struct.pack("<H", NO_DATASET)),
        (STATUS, struct.pack("<H", status)),
    ]
    if comment:
        elements.append((ERROR_COMMENT, _even(comment[:64].encode("ascii", "replace"), b" ")))
    if sop_instance is not None:
        elements.append((AFFECTED_SOP_INSTANCE, _even(sop_instance.encode("ascii", "replace"), b"\x00")))
    return _command_set(elements)


def _command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def p_data_command(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying one command set, fragmented to the peer's maximum PDU length."""
    room = max(peer_max_pdu - 6, 1) if peer_max_pdu else len(command)
    out = []
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command) else 0)
        item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
        out.append(struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item)
    return b"".join(out)


def abort_pdu(reason: int = 0) -> bytes:
    # Source 0x02: the service provider (this SCP's upper layer) aborts.
    return struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, 0x02, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def decode_reject(pdu: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ PDU."""
    if len(pdu) < 10:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "truncated A-ASSOCIATE-RJ")
    return pdu[7], pdu[8], pdu[9]


RELEASE_RP_PDU = struct.pack(">BBII", RELEASE_RP, 0, 4, 0)


@dataclass
class Negotiated:
    """The outcome of one A-ASSOCIATE-RQ: an answer PDU and, if accepted, the contexts."""

    calling_ae: str
    called_ae: str
    answer: bytes
    reject: tuple[int, int, int] | None = None
    # Accepted presentation contexts: context id -> (abstract syntax, transfer syntax).
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    peer_max_pdu: int = 0


def decode_request(data: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(data)
        return pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's malformed PDU
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}") from exc


def _user_information(
    max_pdu: int,
) -> list[MaximumLengthNotification | ImplementationClassUIDNotification | ImplementationVersionNameNotification]:
    """What we announce in an A-ASSOCIATE-RQ or -AC: our maximum PDU and implementation."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    impl_version = ImplementationVersionNameNotification()
    impl_version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    return [length, impl_uid, impl_version]


def negotiate(
    rq: A_ASSOCIATE,
    protocol_version: int,
    supported: list[PresentationContext],
    max_pdu: int,
    refuse: tuple[int, int, int] | None,
) -> Negotiated:
    """Accept the storage/verification contexts we support, or reject with ``refuse`` (checked by the caller)."""
    calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
    if refuse is None and protocol_version & 0x0001 == 0:
        refuse = REJECT_PROTOCOL_VERSION
    if refuse is None and str(rq.application_context_name) != APPLICATION_CONTEXT:
        refuse = REJECT_APPLICATION_CONTEXT
    if refuse is not None:
        return Negotiated(calling, called, reject_pdu(*refuse), reject=refuse)
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in rq.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }
    results, ac_roles = negotiate_as_acceptor(rq.presentation_context_definition_list, supported, roles)
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    ac.user_information = [*_user_information(max_pdu), *ac_roles]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    contexts = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in results
        if cx.result == 0x00 and cx.context_id is not None
    }
    return Negotiated(
        calling, called, pdu.encode(), contexts=contexts, peer_max_pdu=int(rq.maximum_length_received or 0)
    )


# ---------------------------------------------------------------- requestor side (forwarder, probe)

RELEASE_RQ_PDU = struct.pack(">BBII", RELEASE_RQ, 0, 4, 0)


def associate_request(calling_ae: str, called_ae: str, contexts: list[tuple[str, str]], max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ proposing one context per (abstract syntax, transfer syntax), ids 1, 3, 5, ..."""
    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT
    rq.calling_ae_title = calling_ae
    rq.called_ae_title = called_ae
    proposed = []
    for i, (abstract, transfer_syntax) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = [transfer_syntax]
        proposed.append(cx)
    rq.presentation_context_definition_list = proposed
    rq.user_information = [*_user_information(max_pdu)]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def decode_accept(data: bytes, contexts: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], int], int]:
    """From an A-ASSOCIATE-AC: accepted (abstract, transfer syntax) -> context id, and the peer's max PDU."""
    if len(data) < 10 or int.from_bytes(data[2:6], "big") != len(data) - 6:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-AC length does not match its header")
    pdu = A_ASSOCIATE_AC()
    try:
        pdu.decode(data)
        ac = pdu.to_primitive()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's malformed PDU
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-AC: {type(exc).__name__}") from exc
    # pynetdicom's decoder skips what it cannot parse: garbage decodes as "nothing accepted".
    if str(ac.application_context_name or "") != APPLICATION_CONTEXT:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-AC without the DICOM application context")
    accepted: dict[tuple[str, str], int] = {}
    for cx in ac.presentation_context_definition_results_list:
        if cx.context_id is None:  # (pynetdicom's decoder always sets it)
            continue
        index = (int(cx.context_id) - 1) // 2
        if cx.result == 0x00 and 0 <= index < len(contexts) and int(cx.context_id) % 2 == 1:
            abstract, wanted = contexts[index]
            # The acceptor must pick one of the proposed transfer syntaxes: we proposed one.
            if cx.transfer_syntax and str(cx.transfer_syntax[0]) == wanted:
                accepted[(abstract, wanted)] = int(cx.context_id)
    return accepted, int(ac.maximum_length_received or 0)


def store_request(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """The command set of a C-STORE-RQ (a dataset follows), implicit VR little endian."""
    elements: list[tuple[int, bytes]] = [
        (AFFECTED_SOP_CLASS, _even(sop_class.encode("ascii"), b"\x00")),
        (COMMAND_FIELD, struct.pack("<H", C_STORE_RQ)),
        (MESSAGE_ID, struct.pack("<H", message_id)),
        (PRIORITY, struct.pack("<H", priority)),
        (DATASET_TYPE, struct.pack("<H", 0x0001)),
        (AFFECTED_SOP_INSTANCE, _even(sop_instance.encode("ascii"), b"\x00")),
    ]
    return _command_set(elements)


def p_data_dataset(context_id: int, fragment: bytes, last: bool) -> bytes:
    """One P-DATA-TF carrying one dataset fragment (the caller sizes it to the peer's maximum)."""
    item = struct.pack(">IBB", len(fragment) + 2, context_id, 0x02 if last else 0x00) + fragment
    return struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and the file meta group of a received dataset (what pydicom writes, without its cost).

    Explicit VR little endian: (0002,0000) UL group length, (0002,0001) OB
    version, (0002,0002)/(0002,0003)/(0002,0010)/(0002,0012) UI, (0002,0013) SH.
    """

    def short(element: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 2, element, vr, len(value)) + value

    body = (
        struct.pack("<HH2sHI", 2, 0x0001, b"OB", 0, 2)
        + b"\x00\x01"
        + short(0x0002, b"UI", _even(sop_class.encode("ascii", "replace"), b"\x00"))
        + short(0x0003, b"UI", _even(sop_instance.encode("ascii", "replace"), b"\x00"))
        + short(0x0010, b"UI", _even(transfer_syntax.encode("ascii", "replace"), b"\x00"))
        + short(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID.encode("ascii"), b"\x00"))
        + short(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "))
    )
    return b"\x00" * 128 + b"DICM" + short(0x0000, b"UL", struct.pack("<I", len(body))) + body


VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


def echo_request(message_id: int) -> bytes:
    """The command set of a C-ECHO-RQ."""
    return _command_set(
        [
            (AFFECTED_SOP_CLASS, _even(VERIFICATION.encode("ascii"), b"\x00")),
            (COMMAND_FIELD, struct.pack("<H", C_ECHO_RQ)),
            (MESSAGE_ID, struct.pack("<H", message_id)),
            (DATASET_TYPE, struct.pack("<H", NO_DATASET)),
        ]
    )
