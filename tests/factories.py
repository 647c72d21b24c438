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
