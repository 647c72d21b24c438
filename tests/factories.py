"""Event builders shared by the tests: one home, so a new event field is added in one place.

Two families. The numbered ones (``received(n)``, ``placed(n, node)``...) build one study
"1.2.9" whose instance n is "1.2.9.n" with readable ids ("p3-0" is instance 3's first
placement); the catalog tests fold them. The ``*_on``/``*_from`` ones build events with
the services' deterministic ids (``ev.fact_id``), as the probe derives them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import msgspec

from shared import events as ev

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def received(n: int, study: str = "1.2.9") -> ev.InstanceReceivedV1:
    return ev.InstanceReceivedV1(
        event_id=f"r{n}",
        sop_instance_uid=f"1.2.9.{n}",
        sop_class_uid=CT,
        study_instance_uid=study,
        series_instance_uid=f"{study}.1",
        transfer_syntax_uid=EXPLICIT_LE,
        blob_key=f"sha256/00/{n:064x}",
        size=100 + n,
        dataset_digest=f"{n:064x}",
        modality="CT",
        patient_id="DEMO01",
    )


def placed(n: int, node: str, attempt: int = 0) -> ev.InstancePlacedV1:
    return ev.InstancePlacedV1(
        event_id=f"p{n}-{attempt}",
        sop_instance_uid=f"1.2.9.{n}",
        study_instance_uid="1.2.9",
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT_LE,
        blob_key="k",
        dataset_digest="d",
        node_id=node,
        reason=ev.PlacementReason.NEW_STUDY,
        attempt=attempt,
    )


def forwarded(n: int, node: str, attempt: int = 0) -> ev.InstanceForwardedV1:
    return ev.InstanceForwardedV1(
        event_id=f"f{n}-{attempt}",
        sop_instance_uid=f"1.2.9.{n}",
        study_instance_uid="1.2.9",
        node_id=node,
        placement_id=f"p{n}-{attempt}",
    )


def fanned_out(n: int, node: str, pool: str, attempt: int = 0) -> ev.InstancePlacedV1:
    """A placement made by a routing rule that sends the instance to several pools."""
    return msgspec.structs.replace(
        placed(n, node, attempt),
        event_id=f"p{n}-{pool}-{attempt}",
        pool=pool,
        rule="both",
        reason=ev.PlacementReason.RULE,
    )


def verification_failed(n: int, node: str, attempt: int = 0) -> ev.InstanceVerificationFailedV1:
    return ev.InstanceVerificationFailedV1(
        event_id=f"vf{n}-{attempt}",
        sop_instance_uid=f"1.2.9.{n}",
        study_instance_uid="1.2.9",
        node_id=node,
        placement_id=f"p{n}-{attempt}",
        reason="dataset digest mismatch",
        expected_digest="a",
        found_digest="b",
    )


def log_of_two() -> list[tuple[int, ev.AnyEvent]]:
    """Two instances: one forwarded, one refused and dead-lettered."""
    events: list[ev.AnyEvent] = [
        received(1),
        received(2),
        placed(1, "node1"),
        placed(2, "node1"),
        forwarded(1, "node1"),
        ev.InstanceForwardFailedV1(
            event_id="x",
            sop_instance_uid="1.2.9.2",
            study_instance_uid="1.2.9",
            node_id="node1",
            placement_id="p2-0",
            reason="refused",
            permanent=True,
        ),
        ev.InstanceDeadLetteredV1(
            event_id="y",
            sop_instance_uid="1.2.9.2",
            study_instance_uid="1.2.9",
            node_id="node1",
            placement_id="p2-0",
            reason="refused after 1",
        ),
    ]
    return list(enumerate(events, start=1))


def mixed_log() -> list[tuple[int, ev.AnyEvent]]:
    """Every kind the catalog folds, with stale outcomes, a re-received instance and unknown instances."""
    events: list[ev.AnyEvent] = []
    for n in range(1, 7):
        events.append(received(n))
    for n in range(1, 7):
        events.append(placed(n, "node1"))
    events += [
        forwarded(1, "node1"),
        ev.InstanceVerifiedV1(event_id="v1", sop_instance_uid="1.2.9.1", node_id="node1", dataset_digest="d"),
        ev.InstanceVerifiedV1(event_id="v1b", sop_instance_uid="1.2.9.1", node_id="node2", dataset_digest="d"),
        placed(2, "node2", attempt=1),
        forwarded(2, "node1"),  # stale: placement p2-0 is no longer current
        forwarded(2, "node2", attempt=1),
        ev.InstanceForwardFailedV1(
            event_id="ff3",
            sop_instance_uid="1.2.9.3",
            study_instance_uid="1.2.9",
            node_id="node1",
            placement_id="p3-0",
            reason="timeout",
        ),
        ev.NodeStateChangedV1(event_id="ns1", node_id="node3", state=ev.NodeState.DRAINED, reason="maintenance"),
        received(3),  # a re-received instance replaces its header row
        ev.InstanceDeadLetteredV1(
            event_id="dl3",
            sop_instance_uid="1.2.9.3",
            study_instance_uid="1.2.9",
            node_id="node1",
            placement_id="p3-0",
            reason="gave up",
        ),
        ev.NodeStateChangedV1(event_id="ns2", node_id="node3", state=ev.NodeState.UNDRAINED),
        ev.InstanceVerifiedV1(event_id="v9", sop_instance_uid="1.2.9.99", node_id="node1", dataset_digest="d"),
    ]
    return list(enumerate(events, start=1))


def rich_log() -> list[tuple[int, ev.AnyEvent]]:
    """The mixed log plus fan-out to pools, re-placement within a pool and verification outcomes."""

    def fwd(n: int, node: str, pool: str, attempt: int = 0) -> ev.InstanceForwardedV1:
        return msgspec.structs.replace(
            forwarded(n, node, attempt), event_id=f"f{n}-{pool}-{attempt}", placement_id=f"p{n}-{pool}-{attempt}"
        )

    extra: list[ev.AnyEvent] = [
        received(7),
        fanned_out(7, "node1", "archive"),
        fanned_out(7, "node2", "research"),
        fwd(7, "node1", "archive"),
        ev.InstanceVerificationFailedV1(
            event_id="vf7",
            sop_instance_uid="1.2.9.7",
            study_instance_uid="1.2.9",
            node_id="node1",
            placement_id="p7-archive-0",
            reason="mismatch",
        ),
        fanned_out(7, "node3", "archive", attempt=1),
        fwd(7, "node2", "research"),
        ev.InstanceVerifiedV1(
            event_id="v7", sop_instance_uid="1.2.9.7", node_id="node2", dataset_digest="d", placement_id="p7-research-0"
        ),
        forwarded(4, "node1"),
        ev.InstanceVerificationFailedV1(
            event_id="vf4",
            sop_instance_uid="1.2.9.4",
            study_instance_uid="1.2.9",
            node_id="node1",
            placement_id="p4-0",
            reason="not seen",
        ),
        placed(4, "node2", attempt=1),
        received(4),
        ev.NodeStateChangedV1(event_id="ns3", node_id="node1", state=ev.NodeState.DRAINED, reason="disk"),
    ]
    log = mixed_log()
    return log + list(enumerate(extra, start=len(log) + 1))


def placed_on(sop: str, node: str = "node1", digest: str = "d1") -> ev.InstancePlacedV1:
    """A placement with the scheduler's deterministic id, for the probe's stores."""
    return ev.InstancePlacedV1(
        event_id=ev.fact_id("placed", sop, node),
        sop_instance_uid=sop,
        study_instance_uid="1.2",
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT_LE,
        blob_key=f"b/{sop}",
        dataset_digest=digest,
        node_id=node,
        reason=ev.PlacementReason.NEW_STUDY,
    )


def forwarded_from(p: ev.InstancePlacedV1, at: datetime | None = None) -> ev.InstanceForwardedV1:
    """The forwarder's outcome for placement ``p`` (at ``at``, default now)."""
    return ev.InstanceForwardedV1(
        event_id=ev.fact_id("forwarded", p.event_id),
        occurred_at=at or ev.utcnow(),
        sop_instance_uid=p.sop_instance_uid,
        study_instance_uid=p.study_instance_uid,
        node_id=p.node_id,
        placement_id=p.event_id,
    )


def placed_from(r: ev.InstanceReceivedV1, received_seq: int, node: str) -> ev.InstancePlacedV1:
    """The scheduler's first placement of a real received instance (tests that stand in for the scheduler)."""
    return ev.InstancePlacedV1(
        event_id=ev.fact_id("placed", r.sop_instance_uid, received_seq, 0),
        sop_instance_uid=r.sop_instance_uid,
        study_instance_uid=r.study_instance_uid,
        sop_class_uid=r.sop_class_uid,
        transfer_syntax_uid=r.transfer_syntax_uid,
        blob_key=r.blob_key,
        dataset_digest=r.dataset_digest,
        node_id=node,
        reason=ev.PlacementReason.NEW_STUDY,
        received_seq=received_seq,
    )


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


def lying_file(source: Path, dest: Path) -> Path:
    """A copy of ``source`` whose file meta names another SOP Instance UID than its dataset.

    An SCU takes the command's UID from the file meta, so the ingest refuses it (0xC001): a file
    a sender cannot deliver, whatever it retries.
    """
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dest, enforce_file_format=False)  # True would "fix" the meta UID
    return dest


def resent(n: int, calling_ae: str, association: str = "a1") -> ev.InstanceResentV1:
    """Instance n of ``received(n)`` sent again, identical, by ``calling_ae`` in ``association``."""
    r = received(n)
    return ev.InstanceResentV1(
        event_id=f"s{n}-{association}",
        sop_instance_uid=r.sop_instance_uid,
        study_instance_uid=r.study_instance_uid,
        dataset_digest=r.dataset_digest,
        blob_key=r.blob_key,
        calling_ae=calling_ae,
        peer_address="127.0.0.1",
        peer_port=40000 + n,
        association_id=association,
    )
