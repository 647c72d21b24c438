"""NATS identities: permission rendering, subjects and provenance, credential files."""

from __future__ import annotations

import base64
import stat
from typing import TypedDict

import nkeys
import pytest

from shared import events as ev
from shared import natsauth
from shared.bus import provenance_ok, raw_provenance_ok, subject_for
from shared.config import NatsConfig
from shared.membership import transition

CFG = NatsConfig()


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def may_publish(identity: str, subject: str) -> bool:
    p = natsauth.permissions(identity, CFG)
    return any(_matches(a, subject) for a in p.publish) and not any(_matches(d, subject) for d in p.publish_deny)


class InstanceKeys(TypedDict):
    """The fields the per-instance events share, spread into each with ``**``."""

    sop_instance_uid: str
    study_instance_uid: str
    node_id: str
    placement_id: str


def event_subjects() -> dict[str, str]:
    placed = ev.InstancePlacedV1(
        event_id="p",
        sop_instance_uid="1",
        study_instance_uid="2",
        sop_class_uid="3",
        transfer_syntax_uid="4",
        blob_key="b",
        dataset_digest="d",
        node_id="n1",
        reason=ev.PlacementReason.NEW_STUDY,
    )
    common = InstanceKeys(sop_instance_uid="1", study_instance_uid="2", node_id="n1", placement_id="p")
    return {
        "received": "dicom.instance.received",
        "placed": subject_for(placed),
        "forwarded": subject_for(ev.InstanceForwardedV1(event_id="f", **common)),
        "forward_failed": subject_for(ev.InstanceForwardFailedV1(event_id="f", reason="x", **common)),
        "dead_lettered": subject_for(ev.InstanceDeadLetteredV1(event_id="f", reason="x", **common)),
        "verified": subject_for(
            ev.InstanceVerifiedV1(event_id="v", sop_instance_uid="1", node_id="n1", dataset_digest="d")
        ),
        "verification_failed": subject_for(ev.InstanceVerificationFailedV1(event_id="v", reason="x", **common)),
        "heartbeat": subject_for(ev.NodeHeartbeatV1(event_id="h", node_id="n1", up=True)),
        "resent": subject_for(ev.InstanceResentV1(event_id="r", sop_instance_uid="1")),
        "retry_requested": subject_for(ev.InstanceRetryRequestedV1(event_id="r", sop_instance_uid="1")),
        "dead_letter_cancelled": subject_for(ev.InstanceDeadLetterCancelledV1(event_id="c", sop_instance_uid="1")),
        "rules_changed": subject_for(ev.RoutingRulesChangedV1(event_id="r", document="")),
        **{
            state: subject_for(transition(None, "n1", state))
            for state in ("added", "drained", "undrained", "removed", "down", "up")
        },
    }


RIGHTS = {
    "ingest": {"received", "resent"},
    "scheduler": {"placed", "down", "up", "dead_lettered"},
    "forwarder": {"forwarded", "forward_failed", "dead_lettered"},
    "probe": {"heartbeat", "verified", "verification_failed"},
    "catalog": {
        "retry_requested",
        "dead_letter_cancelled",
        "rules_changed",
        "added",
        "drained",
        "undrained",
        "removed",
    },
    "admin": {"added", "drained", "undrained", "removed"},
}


@pytest.mark.parametrize("identity", natsauth.IDENTITIES)
def test_each_identity_publishes_exactly_its_own_events(identity):
    allowed = {kind for kind, subject in event_subjects().items() if may_publish(identity, subject)}
    assert allowed == RIGHTS[identity]


@pytest.mark.parametrize("identity", natsauth.SERVICES)
def test_no_service_may_purge_delete_or_take_another_services_consumer(identity):
    s = CFG.events_stream
    for subject in (
        f"$JS.API.STREAM.PURGE.{s}",
        f"$JS.API.STREAM.DELETE.{s}",
        f"$JS.API.STREAM.UPDATE.{s}",
        f"$JS.API.STREAM.CREATE.{s}",
        f"$JS.API.CONSUMER.DELETE.{s}.scheduler",
        f"$JS.API.CONSUMER.DELETE.{s}.forwarder-n1",
        f"$JS.API.STREAM.MSG.DELETE.{s}",
    ):
        assert not may_publish(identity, subject), subject
    if identity != "scheduler":
        for subject in (
            f"$JS.API.CONSUMER.MSG.NEXT.{s}.scheduler",
            f"$JS.ACK.{s}.scheduler.1.2.3.4.0",
            f"$JS.API.CONSUMER.CREATE.{s}.scheduler.dicom.instance.placed.n1",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.scheduler",
        ):
            assert not may_publish(identity, subject), subject
    if identity != "forwarder":
        assert not may_publish(identity, f"$JS.API.CONSUMER.MSG.NEXT.{s}.forwarder-n1")


def test_only_followers_of_the_log_may_read_it_and_only_the_scheduler_the_kv():
    readers = {i for i in natsauth.IDENTITIES if may_publish(i, f"$JS.API.CONSUMER.CREATE.{CFG.events_stream}")}
    assert readers == {"scheduler", "forwarder", "probe", "catalog", "admin"}
    kv = {i for i in natsauth.IDENTITIES if may_publish(i, "$KV.study-affinity.x")}
    assert kv == {"scheduler"}


def test_inboxes_are_private():
    for identity in natsauth.IDENTITIES:
        subs = natsauth.permissions(identity, CFG).subscribe
        for other in natsauth.IDENTITIES:
            inbox = f"{natsauth.inbox_prefix(CFG, other)}.abc"
            assert any(_matches(p, inbox) for p in subs) == (other == identity)


def test_rendered_authorization_holds_public_keys_and_permissions_only():
    seed = natsauth.new_seed()
    text = natsauth.render_authorization({"scheduler": natsauth.public_key(seed)}, CFG)
    assert natsauth.public_key(seed) in text and seed.decode() not in text
    assert '"dicom.instance.placed.*"' in text and "authorization {" in text
    with pytest.raises(ValueError):
        natsauth.permissions("evil", CFG)


def test_node_state_subject_carries_the_state_and_provenance_is_checked():
    added = transition(None, "n1", "added")
    assert subject_for(added) == "node.state.n1.added"
    assert provenance_ok("node.state.n1.added", added)
    # A forged "added" payload on a subject the scheduler may use is refused.
    assert not provenance_ok("node.state.n1.down", added)
    assert not provenance_ok("node.state.evil.added", added)
    # Logs recorded before the state was in the subject still replay.
    assert provenance_ok("node.state.n1", added)
    beat = ev.NodeHeartbeatV1(event_id="h", node_id="n1", up=True)
    assert not provenance_ok("dicom.instance.received", beat)
    # The same check on undecoded payloads (the catalog's projection path).
    for subject, event, ok in (
        ("node.state.n1.added", added, True),
        ("node.state.n1.down", added, False),
        ("node.state.n1", added, True),
        ("node.heartbeat.n1", beat, True),
        ("node.heartbeat.n2", beat, False),
    ):
        assert raw_provenance_ok(subject, ev.encode(event)) is ok, subject
    assert not raw_provenance_ok("node.heartbeat.n1", b"not json")


def test_the_nonce_signature_verifies_with_the_public_key():
    seed = natsauth.new_seed()
    sig = natsauth.sign_nonce(seed, "abc123")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    assert nkeys.from_seed(bytearray(seed)).verify(b"abc123", raw)


def test_generated_credentials_are_private_and_kept(tmp_path):
    creds = natsauth.generate(tmp_path / "creds", CFG)
    assert stat.S_IMODE((tmp_path / "creds").stat().st_mode) == 0o700
    for identity in natsauth.IDENTITIES:
        path = creds.seed_file(identity)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes().startswith(b"SU")
    assert stat.S_IMODE(creds.auth_conf.stat().st_mode) == 0o600
    again = natsauth.generate(tmp_path / "creds", CFG)
    assert again.public_keys == creds.public_keys
    rotated = natsauth.generate(tmp_path / "creds", CFG, keep=False)
    assert set(rotated.public_keys.values()).isdisjoint(creds.public_keys.values())


def test_no_seed_is_refused_unless_unauthenticated_is_chosen(caplog):
    with pytest.raises(natsauth.NoCredentials):
        natsauth.connect_options(NatsConfig(), "ingest")
    opts = natsauth.connect_options(NatsConfig(allow_unauthenticated=True), "ingest")
    assert "nkeys_seed" not in opts and opts["inbox_prefix"] == "_INBOX_ingest"
    assert "unauthenticated" in caplog.text
    opts = natsauth.connect_options(NatsConfig(nkey_seed_file="/s/{identity}.nk"), "probe")
    assert opts["nkeys_seed"] == "/s/probe.nk"


def test_the_catalog_may_record_operator_actions_and_nothing_else_new():
    """The console's door: exactly the three operator subjects and the admin's node states, no JetStream admin."""
    pub = set(natsauth.permissions("catalog", CFG).publish)
    reading = {
        "$JS.API.INFO",
        *(f"$JS.API.STREAM.INFO.{x}" for x in (CFG.events_stream, CFG.heartbeats_stream)),
        *(f"$JS.API.CONSUMER.CREATE.{x}" for x in (CFG.events_stream, CFG.heartbeats_stream)),
        *(f"$JS.FC.{x}.>" for x in (CFG.events_stream, CFG.heartbeats_stream)),
        f"$JS.API.CONSUMER.INFO.{CFG.events_stream}.*",  # the overview's consumer lag, info only
    }
    assert pub - reading == {
        "dicom.instance.operator.retry_requested",
        "dicom.instance.operator.dead_letter_cancelled",
        "dicom.instance.operator.rules_changed",
        *(f"node.state.*.{st}" for st in natsauth.ADMIN_STATES),
    }
    for subject in (
        "dicom.instance.placed.n1",
        "dicom.instance.dead_lettered",
        "node.state.n1.down",
        "$KV.study-affinity.x",
        f"$JS.ACK.{CFG.events_stream}.forwarder-n1.1.2.3.4.0",
        f"$JS.API.CONSUMER.INFO.{CFG.heartbeats_stream}.x",
    ):
        assert not may_publish("catalog", subject), subject
    for durable in (*natsauth.SCHEDULER_DURABLES, "forwarder-n1"):
        assert may_publish("catalog", f"$JS.API.CONSUMER.INFO.{CFG.events_stream}.{durable}"), durable
