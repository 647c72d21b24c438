"""Membership fold and state-transition ids (pure)."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import events as ev
from shared.config import NodeConfig, NodeCredentials
from shared.membership import Member, Pool, node_from, transition

SEED = [NodeConfig(id="n1"), NodeConfig(id="n2")]


def state(node_id: str, s: str, **kw) -> ev.NodeStateChangedV1:
    # cast: unknown states too ("exploded"), as an older or newer writer may have logged them
    return ev.NodeStateChangedV1(event_id=f"{node_id}-{s}", node_id=node_id, state=cast(ev.NodeState, s), **kw)


def member(pool: Pool, node_id: str) -> Member:
    m = pool.get(node_id)
    assert m is not None, node_id
    return m


def test_config_seeds_and_events_apply_in_order():
    pool = Pool(SEED)
    pool.apply(5, state("n1", "drained"))
    pool.apply(6, state("n3", "added", dicom_port=5000, ae_title="N3", rest_url="http://127.0.0.1:9"))
    pool.apply(7, state("n2", "down"))
    pool.apply(8, state("n2", "removed"))
    assert [m.node.id for m in pool.active()] == ["n1", "n3"]
    assert member(pool, "n1").state == "drained" and member(pool, "n2").state == "removed"
    assert member(pool, "n3").node.dicom_port == 5000 and member(pool, "n3").node.ae_title == "N3"
    assert pool.last_seq == 8 and member(pool, "n1").last_seq == 5
    pool.apply(9, state("n1", "undrained"))
    pool.apply(10, state("n2", "added"))
    assert member(pool, "n1").state == "active" and member(pool, "n2").state == "active"


def test_unknown_node_or_state_is_ignored():
    pool = Pool(SEED)
    assert pool.apply(3, state("ghost", "drained")) is None
    assert pool.apply(4, state("n1", "exploded")) is None
    assert member(pool, "n1").state == "active"


def test_transition_ids_are_one_per_transition():
    pool = Pool(SEED)
    m = pool.get("n1")
    first = transition(m, "n1", "down", "missed heartbeats")
    # Two replicas seeing the same log publish the same fact.
    assert transition(m, "n1", "down", "other words").event_id == first.event_id
    pool.apply(11, first)
    pool.apply(12, transition(m, "n1", "up"))
    assert transition(m, "n1", "down").event_id != first.event_id


def test_added_event_carries_the_node_address():
    node = NodeConfig(
        id="n9",
        host="10.0.0.9",
        dicom_port=104,
        ae_title="N9",
        rest_url="http://10.0.0.9:8042",
        username="u",
        password="p",
    )
    event = transition(None, "n9", "added", node=node)
    # Everything but the password, which comes from config.
    assert node_from(event, credentials=NodeCredentials(password="p")) == node


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["n1", "n2", "n3"]),
            st.sampled_from(["added", "drained", "undrained", "removed", "down", "up"]),
        ),
        max_size=30,
    )
)
def test_replaying_the_same_log_gives_the_same_pool(log):
    def fold():
        pool = Pool(SEED)
        for seq, (node_id, s) in enumerate(log, start=1):
            pool.apply(seq, state(node_id, s))
        return {k: (m.state, m.last_seq) for k, m in pool.members.items()}

    assert fold() == fold()


async def test_affinity_cache_stays_bounded():

    from services.scheduler.affinity import Affinity

    class NoKV:  # only the cache is exercised: every study is already cached
        pass

    aff = Affinity(NoKV())
    aff.CACHE_SIZE = 3
    for i in range(5):
        aff._remember(f"s{i}", ("n1", i))
    assert list(aff.cache) == ["s2", "s3", "s4"]
    assert await aff.get("s2") == ("n1", 2)
    aff._remember("s5", ("n2", 5))
    assert list(aff.cache) == ["s4", "s2", "s5"]
    aff.forget_node("n1")
    assert list(aff.cache) == ["s5"]


def test_added_node_event_carries_no_password_and_config_supplies_it():
    node = NodeConfig(id="n9", dicom_port=5009, ae_title="N9", rest_url="http://127.0.0.1:9", password="s3cret-pw")
    event = transition(None, "n9", "added", "cli", node)
    assert b"s3cret-pw" not in ev.encode(event)
    pool = Pool(SEED, NodeCredentials(username="ops", password="from-config"))
    pool.apply(1, event)
    added = member(pool, "n9").node
    assert added.password == "from-config" and added.dicom_port == 5009
    # A seeded node re-added keeps its configured password.
    seeded = Pool([NodeConfig(id="n1", password="seeded-pw")])
    seeded.apply(1, state("n1", "removed"))
    seeded.apply(2, state("n1", "added", dicom_port=6000))
    assert member(seeded, "n1").node.password == "seeded-pw"


# Payloads as older releases wrote them (the log is replayed): the enums must decode them unchanged.
OLD_STATE = (
    b'{"type":"node.state_changed.v1","event_id":"e1","occurred_at":"2026-01-01T00:00:00Z",'
    b'"node_id":"n1","state":"%s","reason":"no heartbeat for 5s"}'
)
OLD_PLACED = (
    b'{"type":"instance.placed.v1","event_id":"e2","sop_instance_uid":"1.2.3.4",'
    b'"study_instance_uid":"1.2.3","sop_class_uid":"1.2.840","transfer_syntax_uid":"1.2.840.10008.1.2.1",'
    b'"blob_key":"k","dataset_digest":"d","node_id":"n1","reason":"%s"}'
)


def test_old_payloads_decode_to_the_enums_and_encode_back_unchanged():
    for s in ("added", "drained", "undrained", "removed", "down", "up"):
        event = ev.decode(OLD_STATE % s.encode())
        assert isinstance(event, ev.NodeStateChangedV1)
        assert event.state is ev.NodeState(s) and event.state == s
        assert ev.encode(event).count(b'"state":"%s"' % s.encode()) == 1
    for r in ("new_study", "affinity", "rule", "failover", "replacement"):
        event = ev.decode(OLD_PLACED % r.encode())
        assert isinstance(event, ev.InstancePlacedV1)
        assert event.reason is ev.PlacementReason(r)
        assert b'"reason":"%s"' % r.encode() in ev.encode(event)
    # Wire values the catalog and the scheduler compare against: never to change.
    assert [m.value for m in ev.LocationState] == [
        "placed",
        "forwarded",
        "failed",
        "dead_lettered",
        "verified",
        "verification_failed",
        "cancelled",
    ]
    assert ev.NODE_GONE_REASONS == {"node down", "node removed"}


def test_transition_takes_enum_or_wire_string_and_keeps_the_ids():
    m = Pool(SEED).get("n1")
    by_enum = transition(m, "n1", ev.NodeState.DOWN, "x")
    assert by_enum.event_id == transition(m, "n1", "down", "x").event_id == ev.fact_id("node_state", "n1", "down", 0)
    with pytest.raises(ValueError, match="unknown node state"):
        transition(m, "n1", "exploded")
