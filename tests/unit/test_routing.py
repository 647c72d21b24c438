"""Routing rules and pools (pure): first match wins, pools restrict the candidates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.affinity import affinity_scope, study_key
from services.scheduler.policy import NodeView, Weights, place
from services.scheduler.routing import DEFAULT_ROUTE, Route, header_value, in_pool, matches, route
from services.scheduler.scheduler import placement_id
from shared import events as ev
from shared.config import ConfigError, RoutingConfig, RoutingRule, dump_toml, load_config

W = Weights()


def place_in_pool(study_uid, nodes, pool, routing, affinity, w):
    """What the scheduler does: the policy over the pool's nodes only."""
    return place(study_uid, in_pool(nodes, pool, routing.pools), affinity, w)


NODE_IDS = [f"n{i}" for i in range(6)]


def received(**kw) -> ev.InstanceReceivedV1:
    base = dict(
        event_id="e",
        sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key="sha256/ab/cd",
        size=10,
        dataset_digest="d",
        modality="MR",
        calling_ae="SCANNER1",
        called_ae="SWITCHYARD",
        study_description="Brain MRI",
    )
    return ev.InstanceReceivedV1(**{**base, **kw})


RULES = [
    RoutingRule(
        name="research", pools=["archive", "research"], match={"Manufacturer": "ACME*", "modality": ["CT", "MR"]}
    ),
    RoutingRule(name="mr", pools=["mr"], match={"modality": "MR"}),
    RoutingRule(name="ct-from-er", pools=["archive"], match={"modality": "CT", "calling_ae": "ER_*"}),
]


def test_first_matching_rule_wins_and_no_match_is_the_default_pool():
    assert route(received(), RULES) == Route("mr", ("mr",))
    assert route(received(extra_tags={"Manufacturer": "ACME Medical"}), RULES) == Route(
        "research", ("archive", "research")
    )
    assert route(received(modality="CT", calling_ae="ER_3"), RULES) == Route("ct-from-er", ("archive",))
    # Every key must match: a CT from another AE matches no rule.
    assert route(received(modality="CT", calling_ae="WARD"), RULES) == DEFAULT_ROUTE
    assert route(received(), []) == DEFAULT_ROUTE


def test_match_on_named_fields_tags_exact_and_glob():
    r = received(extra_tags={"BodyPartExamined": "HEAD"})
    assert header_value(r, "sop_class_uid") == "1.2.840.10008.5.1.4.1.1.4"
    assert header_value(r, "BodyPartExamined") == "HEAD" and header_value(r, "Missing") is None
    assert matches(RoutingRule(name="a", pools=["p"], match={"study_description": "Brain*"}), r)
    assert matches(RoutingRule(name="a", pools=["p"], match={"called_ae": "SWITCHYARD"}), r)
    # Exact means exact: case and whole value.
    assert not matches(RoutingRule(name="a", pools=["p"], match={"modality": "mr"}), r)
    assert not matches(RoutingRule(name="a", pools=["p"], match={"calling_ae": "SCANNER"}), r)
    # A tag the instance does not carry never matches, not even "*".
    assert not matches(RoutingRule(name="a", pools=["p"], match={"Manufacturer": "*"}), r)
    assert matches(RoutingRule(name="all", pools=["p"]), r)


def test_pool_restricts_candidates_and_waits_rather_than_going_elsewhere():
    routing = RoutingConfig(pools={"b": ["n1"], "ac": ["n0", "n2"]})
    nodes = [NodeView(n, live=True) for n in ("n0", "n1", "n2")]
    assert place_in_pool("1.2", nodes, "b", routing, None, W).node_id == "n1"
    assert place_in_pool("1.2", nodes, "ac", routing, None, W).node_id in {"n0", "n2"}
    assert {n.node_id for n in in_pool(nodes, "all", routing.pools)} == {"n0", "n1", "n2"}
    # The pool's only node is down: no decision (the scheduler retries later), even with n0, n2 live.
    down = [NodeView("n0", live=True), NodeView("n1", live=False), NodeView("n2", live=True)]
    assert place_in_pool("1.2", down, "b", routing, None, W) is None
    # Affinity on a node outside the pool is not followed.
    assert place_in_pool("1.2", nodes, "ac", routing, "n1", W).reason == "failover"


def test_default_pool_keeps_old_ids_and_keys_other_pools_get_their_own():
    assert placement_id("1.2.3.4", 7, 0, "") == ev.fact_id("placed", "1.2.3.4", 7, 0)
    assert placement_id("1.2.3.4", 7, 0, "all") == placement_id("1.2.3.4", 7, 0, "")
    ids = {placement_id("1.2.3.4", 7, 0, p) for p in ("", "archive", "research")}
    assert len(ids) == 3
    assert study_key(affinity_scope("1.2.3", "")) == study_key("1.2.3")
    assert len({study_key(affinity_scope("1.2.3", p)) for p in ("", "archive", "research")}) == 3


node_views = st.lists(
    st.builds(
        NodeView,
        node_id=st.sampled_from(NODE_IDS),
        live=st.booleans(),
        drained=st.booleans(),
        pending_jobs=st.integers(0, 50),
        reserved=st.integers(0, 20),
        rtt_ms=st.none() | st.floats(0, 500),
    ),
    max_size=6,
    unique_by=lambda n: n.node_id,
)
pools = st.dictionaries(
    st.sampled_from(["p", "q", "r"]), st.lists(st.sampled_from(NODE_IDS + ["ghost"]), max_size=4), max_size=3
)


@given(node_views, pools, st.sampled_from(["p", "q", "r", "all"]), st.none() | st.sampled_from(NODE_IDS))
def test_never_outside_the_pool_never_down_or_drained(nodes, pool_map, pool, affinity):
    routing = RoutingConfig(pools=pool_map)
    decision = place_in_pool("1.2.840.1", nodes, pool, routing, affinity, W)
    members = set(NODE_IDS) if pool == "all" else set(pool_map.get(pool, []))
    eligible = {n.node_id for n in nodes if n.live and not n.drained and n.node_id in members}
    if not eligible:
        assert decision is None
    else:
        assert decision.node_id in eligible
        assert {c[0] for c in decision.candidates} == eligible


@given(
    st.lists(
        st.builds(
            lambda name, value: RoutingRule(name=name, pools=["p"], match={"modality": value}),
            st.sampled_from("abcdef"),
            st.sampled_from(["MR", "CT", "C*", "*", "US"]),
        ),
        max_size=6,
        unique_by=lambda r: r.name,
    ),
    st.sampled_from(["MR", "CT", "US", "OT"]),
)
def test_the_chosen_rule_is_the_first_that_matches(rules, modality):
    r = received(modality=modality)
    chosen = route(r, rules)
    matching = [rule for rule in rules if matches(rule, r)]
    assert chosen == (Route(matching[0].name, ("p",)) if matching else DEFAULT_ROUTE)


def test_rules_and_pools_from_toml_and_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[ingest]\nextra_tags = ["Manufacturer"]\n'
        '[routing.pools]\nmr = ["node2"]\nac = ["node1", "node3"]\n'
        '[[routing.rules]]\nname = "mr"\npools = ["mr"]\nmatch = { modality = "MR" }\n'
        '[[routing.rules]]\nname = "acme"\npools = ["ac", "mr"]\n'
        'match = { Manufacturer = ["ACME*", "Other"] }\n'
    )
    cfg = load_config(path, env={})
    assert cfg.routing.pools == {"mr": ["node2"], "ac": ["node1", "node3"]}
    assert [r.name for r in cfg.routing.rules] == ["mr", "acme"]
    assert cfg.routing.rules[1].match == {"Manufacturer": ["ACME*", "Other"]}
    dumped = tmp_path / "d.toml"
    dumped.write_text(dump_toml(cfg))
    assert load_config(dumped, env={}) == cfg
    env = load_config(
        env={
            "SWITCHYARD_ROUTING__POOLS": '{"b": ["node2"]}',
            "SWITCHYARD_ROUTING__RULES": '[{"name": "mr", "pools": ["b"], "match": {"modality": "MR"}}]',
        }
    )
    assert env.routing.rules[0].pools == ["b"] and env.routing.pools == {"b": ["node2"]}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SWITCHYARD_ROUTING__RULES": '[{"name": "x", "pools": ["nope"]}]'}, "unknown pools"),
        ({"SWITCHYARD_ROUTING__RULES": '[{"name": "x", "pools": []}]'}, "no pools"),
        ({"SWITCHYARD_ROUTING__POOLS": '{"all": ["node1"]}'}, "built in"),
        (
            {"SWITCHYARD_ROUTING__RULES": '[{"name": "x", "pools": ["all"], "match": {"Manufacturer": "A"}}]'},
            "ingest.extra_tags",
        ),
        (
            {"SWITCHYARD_ROUTING__RULES": '[{"name": "x", "pools": ["all"]}, {"name": "x", "pools": ["all"]}]'},
            "defined twice",
        ),
    ],
)
def test_bad_rules_are_a_clear_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)
