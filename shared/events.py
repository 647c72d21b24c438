"""Event schemas: every fact Switchyard records on the log.

Each event is a msgspec Struct tagged by its type name, which carries a version
(``...v1``). New fields get defaults; a breaking change is a new type. The
``event_id`` is derived from the fact (not random), so a retried publish carries
the same Nats-Msg-Id and JetStream records the fact once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum

import msgspec

# -- Contracts: values compared across services ---------------------------------
# Each value is the exact string on the wire (the log is replayed, old logs must
# decode): never change a value, only add members.


class NodeState(StrEnum):
    """``NodeStateChangedV1.state``: membership transitions, folded by shared.membership."""

    ADDED = "added"
    DRAINED = "drained"
    UNDRAINED = "undrained"
    REMOVED = "removed"
    DOWN = "down"
    UP = "up"


class PlacementReason(StrEnum):
    """``InstancePlacedV1.reason``: why the scheduler chose the node."""

    NEW_STUDY = "new_study"
    AFFINITY = "affinity"
    RULE = "rule"
    FAILOVER = "failover"
    REPLACEMENT = "replacement"
    # The same SOP Instance UID received again with other content: where its first copy is.
    NEW_VERSION = "new_version"
    # An operator asked to place a dead letter again (instance.retry_requested.v1).
    OPERATOR_RETRY = "operator_retry"


class FailureReason(StrEnum):
    """Forward-failure and dead-letter reasons the scheduler acts on (others are free text).

    The forwarder hands a down or removed node's backlog back with these; the
    scheduler re-places such a dead letter without avoiding the node.
    """

    NODE_DOWN = "node down"
    NODE_REMOVED = "node removed"


# Dead-letter reasons meaning the node itself was gone, not that it failed the delivery.
NODE_GONE_REASONS = frozenset({FailureReason.NODE_DOWN, FailureReason.NODE_REMOVED})


class LocationState(StrEnum):
    """Where one placement of an instance stands (the read model's ``locations.state``)."""

    PLACED = "placed"
    FORWARDED = "forwarded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    VERIFIED = "verified"
    VERIFICATION_FAILED = "verification_failed"
    # An operator closed the dead letter without delivering it (instance.dead_letter_cancelled.v1).
    CANCELLED = "cancelled"


# -------------------------------------------------------------------------------

_NAMESPACE = uuid.UUID("6f2b1d52-4c1e-4a8e-9a51-5d3f0c7e2b10")


def fact_id(kind: str, *parts: object) -> str:
    """A deterministic event id for one fact (same fact, same id)."""
    return str(uuid.uuid5(_NAMESPACE, "|".join([kind, *map(str, parts)])))


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, kw_only=True, tag_field="type"):
    event_id: str
    occurred_at: datetime = msgspec.field(default_factory=utcnow)
    # W3C trace context of the span that produced the event.
    traceparent: str = ""
    tracestate: str = ""


class InstanceReceivedV1(Event, tag="instance.received.v1"):
    """Ingest holds the bytes durably (blob) and has taken responsibility."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    # sha256 of the dataset bytes after the file meta group, as received.
    dataset_digest: str
    calling_ae: str = ""
    called_ae: str = ""
    # The sending peer's IP address and TCP port as ingest saw them (provenance).
    peer_address: str = ""
    peer_port: int = 0
    modality: str = ""
    # Header values for the catalog. They live in the log (a medical record, like
    # any PACS database), never in logs, span attributes or metric labels.
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    series_number: str = ""
    instance_number: str = ""
    extra_tags: dict[str, str] = {}


class Candidate(msgspec.Struct, frozen=True):
    node_id: str
    score: float


class InstancePlacedV1(Event, tag="instance.placed.v1"):
    """The scheduler chose a node for one received instance."""

    sop_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    dataset_digest: str
    node_id: str
    reason: PlacementReason
    candidates: list[Candidate] = []
    # 0 for the first placement, +1 for every re-placement.
    attempt: int = 0
    received_seq: int = 0
    # Re-placement: the placement this one replaces, and nodes it must avoid.
    replaces: str = ""
    avoid: list[str] = []
    # Set when this placement moved the study's affinity away from that node.
    study_moved_from: str = ""
    # Routing: the rule that chose the pool and the pool the node was chosen from
    # ("" for both: no rule matched, pool "all"). Re-placements stay in the pool.
    rule: str = ""
    pool: str = ""
    # Failed verifications of this instance on earlier nodes (a second one is final).
    verification_failures: int = 0
    # Earlier placements of this instance handed back because their node went down
    # (not counted against scheduler.max_attempts).
    handbacks: int = 0
    # When ingest recorded the instance (its received event's occurred_at), for the
    # received -> verified latency; None on re-placements and older events.
    received_at: datetime | None = None


class InstanceForwardedV1(Event, tag="instance.forwarded.v1"):
    sop_instance_uid: str
    study_instance_uid: str
    node_id: str
    placement_id: str
    duration_ms: float = 0.0
    status: int = 0
    # True when a redelivered placement was found already on its node (a lost ack):
    # settled as delivered, not sent again.
    already_present: bool = False
    # From the placement: when ingest recorded the instance (received -> verified latency).
    received_at: datetime | None = None


class InstanceForwardFailedV1(Event, tag="instance.forward_failed.v1"):
    sop_instance_uid: str
    study_instance_uid: str
    node_id: str
    placement_id: str
    reason: str
    # True when retrying the same node cannot help (e.g. transfer syntax refused).
    permanent: bool = False
    delivery: int = 1
    status: int | None = None
    # The node itself failed (unreachable, association rejected), not this instance:
    # the forwarder pauses the node's worker; no delivery is used up. A liveness witness.
    node_failure: bool = False


class InstanceDeadLetteredV1(Event, tag="instance.dead_lettered.v1"):
    sop_instance_uid: str
    study_instance_uid: str
    node_id: str
    placement_id: str
    reason: str
    # From the placement, so the scheduler can place the instance again.
    received_seq: int = 0
    attempt: int = 0
    avoid: list[str] = []
    pool: str = ""
    # For an operator, never placed again (e.g. verification failed on two nodes).
    final: bool = False
    # False for a hand-back because the node went down or was removed: the scheduler
    # places it again without using up one of its attempts.
    counts_as_attempt: bool = True
    # Hand-backs so far for this instance (from the placement), so attempts can discount them.
    handbacks: int = 0


class InstanceVerifiedV1(Event, tag="instance.verified.v1"):
    sop_instance_uid: str
    node_id: str
    dataset_digest: str
    study_instance_uid: str = ""
    placement_id: str = ""
    # The node holds other bytes for an equal dataset (e.g. deflate or group lengths
    # re-encoded); dataset_digest is then the node's file's.
    reencoded: bool = False


class InstanceVerificationFailedV1(Event, tag="instance.verification_failed.v1"):
    """The probe could not confirm a forwarded instance on its node: the
    delivery failed (reason: not seen before the deadline, or digest mismatch)."""

    sop_instance_uid: str
    study_instance_uid: str
    node_id: str
    placement_id: str
    reason: str
    expected_digest: str = ""
    found_digest: str = ""
    # From the placement (as on a dead letter), so the scheduler can place the
    # instance again elsewhere; received_seq 0: not re-placeable (older probe).
    received_seq: int = 0
    attempt: int = 0
    avoid: list[str] = []
    pool: str = ""
    # From the placement: failed verifications on earlier nodes (this one not counted).
    verification_failures: int = 0


class NodeHeartbeatV1(Event, tag="node.heartbeat.v1"):
    """Load of one node as the probe saw it; telemetry, short retention."""

    node_id: str
    up: bool
    error: str = ""
    pending_jobs: int = 0
    instance_count: int = 0
    disk_used_bytes: int = 0
    disk_free_bytes: int | None = None
    cpu_percent: float | None = None
    rtt_ms: float | None = None
    # Orthanc version (/system) and its Prometheus samples (/tools/metrics-prometheus), when exposed.
    version: str = ""
    metrics: dict[str, float] = {}


class NodeStateChangedV1(Event, tag="node.state_changed.v1"):
    """Membership: added, drained, undrained, removed, down, up."""

    node_id: str
    state: NodeState
    reason: str = ""
    # On "added": where the node is. No password: the log is replayed, projected
    # and exported for audits, so REST credentials come from config
    # (a seeded [[nodes]] entry, else [node_credentials]).
    host: str = ""
    dicom_port: int = 0
    ae_title: str = ""
    rest_url: str = ""
    username: str = ""
    # Who asked (a console principal or the CLI's admin identity) and why (operator changes only).
    actor: str = ""


class InstanceRetryRequestedV1(Event, tag="instance.retry_requested.v1"):
    """An operator asked to place a dead-lettered instance again (the scheduler acts on it).

    Carries what the scheduler needs from the dead letter (as a dead letter does),
    so it can place the instance without reading the catalog.
    """

    sop_instance_uid: str
    study_instance_uid: str = ""
    # The chosen node ("": the scheduler's choice); used when it is active.
    node_id: str = ""
    actor: str = ""
    reason: str = ""
    # From the dead letter being retried.
    placement_id: str = ""
    received_seq: int = 0
    attempt: int = 0
    pool: str = ""


class InstanceDeadLetterCancelledV1(Event, tag="instance.dead_letter_cancelled.v1"):
    """An operator closed a dead letter: not delivered, no longer listed as open."""

    sop_instance_uid: str
    study_instance_uid: str = ""
    # The dead letter's node and placement (its location row).
    node_id: str = ""
    placement_id: str = ""
    actor: str = ""
    reason: str = ""


class RoutingRulesChangedV1(Event, tag="routing.rules_changed.v1"):
    """The routing rules and pools as an operator set them; the scheduler applies the latest.

    ``document`` is the TOML text of a ``[routing]`` table (rules and pools), as
    in the config file: the log keeps every version, who set it and why.
    """

    document: str
    actor: str = ""
    reason: str = ""


class InstanceResentV1(Event, tag="instance.resent.v1"):
    """An instance already held (same SOP Instance UID, identical dataset) was sent again.

    Recorded for the audit only: nothing is placed again. Different content under the same
    UID is not a re-send: it is a new ``instance.received.v1`` (a version). One per
    association and instance (``event_id`` names the association).
    """

    sop_instance_uid: str
    study_instance_uid: str = ""
    dataset_digest: str = ""
    blob_key: str = ""
    calling_ae: str = ""
    called_ae: str = ""
    peer_address: str = ""
    peer_port: int = 0
    association_id: str = ""
    same_content: bool = True


AnyEvent = (
    InstanceReceivedV1
    | InstancePlacedV1
    | InstanceForwardedV1
    | InstanceForwardFailedV1
    | InstanceDeadLetteredV1
    | InstanceVerifiedV1
    | NodeHeartbeatV1
    | NodeStateChangedV1
    | InstanceVerificationFailedV1
    | InstanceResentV1
    | InstanceRetryRequestedV1
    | InstanceDeadLetterCancelledV1
    | RoutingRulesChangedV1
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> AnyEvent:
    """Decode any event; raises msgspec.DecodeError on bytes that are not one."""
    return _decoder.decode(data)
