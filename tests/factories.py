"""Event builders for tests (a test module never imports another test module)."""

from __future__ import annotations

from shared import events as ev


def received(n: int, study: str = "1.2.9") -> ev.InstanceReceivedV1:
    return ev.InstanceReceivedV1(
        event_id=f"r{n}", sop_instance_uid=f"1.2.9.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study, series_instance_uid=f"{study}.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key=f"sha256/00/{n:064x}", size=100 + n, dataset_digest=f"{n:064x}", modality="CT",
        patient_id="DEMO01",
    )


def placed(n: int, node: str, attempt: int = 0) -> ev.InstancePlacedV1:
    return ev.InstancePlacedV1(
        event_id=f"p{n}-{attempt}", sop_instance_uid=f"1.2.9.{n}", study_instance_uid="1.2.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key="k", dataset_digest="d", node_id=node, reason="new_study", attempt=attempt,
    )


def forwarded(n: int, node: str, attempt: int = 0) -> ev.InstanceForwardedV1:
    return ev.InstanceForwardedV1(event_id=f"f{n}-{attempt}", sop_instance_uid=f"1.2.9.{n}",
                                  study_instance_uid="1.2.9", node_id=node, placement_id=f"p{n}-{attempt}")


# DICOM wire builders (bad input); imports kept local: the event builders above need none.


def store_pdus(ds, command_uid: str, context_id: int, max_pdu: int, raw: bytes | None = None) -> list[bytes]:
    """The encoded P-DATA-TF PDUs of one C-STORE-RQ, written by hand (command, then dataset).

    ``raw``: dataset bytes to send instead of ``ds`` encoded (a malformed dataset).
    """
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF

    prim = C_STORE()
    prim.MessageID = 7
    prim.AffectedSOPClassUID = ds.SOPClassUID
    prim.AffectedSOPInstanceUID = command_uid
    prim.Priority = 2
    if raw is None:
        raw = encode(ds, False, True)
        assert raw is not None, "pynetdicom could not encode the dataset"
    prim.DataSet = io.BytesIO(raw)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    pdus = []
    for p_data in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(pdu.encode())
    return pdus


def associate_rq(
    calling_ae: bytes,
    called_ae: bytes,
    abstract_syntax: str,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU with the AE titles as given, unchecked (control characters included)."""
    import struct

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(body)) + body

    def ae(title: bytes) -> bytes:
        return title[:16].ljust(16, b" ")

    context = item(
        0x20, bytes([1, 0, 0, 0]) + item(0x30, abstract_syntax.encode()) + item(0x40, transfer_syntax.encode())
    )
    body = (
        struct.pack(">HH", 1, 0)
        + ae(called_ae)
        + ae(calling_ae)
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + context
        + item(0x50, item(0x51, struct.pack(">I", max_pdu)))
    )
    return struct.pack(">BxI", 0x01, len(body)) + body
