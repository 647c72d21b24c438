"""The placement policy: never a down or drained node, affinity kept, equal nodes share."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.policy import Decision, NodeView, Weights, place, score

W = Weights()

node_views = st.lists(
    st.builds(
        NodeView,
        node_id=st.sampled_from([f"n{i}" for i in range(6)]),
        live=st.booleans(),
        drained=st.booleans(),
        pending_jobs=st.integers(0, 50),
        instance_count=st.integers(0, 10**6),
        disk_free_bytes=st.none() | st.integers(0, 10**13),
        cpu_percent=st.none() | st.floats(0, 100),
        rtt_ms=st.none() | st.floats(0, 500),
        reserved=st.integers(0, 100),
    ),
    max_size=6,
    unique_by=lambda n: n.node_id,
)
study_uids = st.from_regex(r"1\.2\.[0-9]{1,10}\.[0-9]{1,10}", fullmatch=True)


def chosen(study: str, nodes: list[NodeView], affinity: str | None, weights: Weights) -> Decision:
    """place() where a node is eligible: the test fails here if none was chosen."""
    decision = place(study, nodes, affinity, weights)
    assert decision is not None
    return decision


@given(node_views, study_uids, st.none() | st.sampled_from([f"n{i}" for i in range(6)]))
def test_never_a_down_or_drained_node(nodes, study, affinity):
    decision = place(study, nodes, affinity, W)
    eligible = {n.node_id for n in nodes if n.live and not n.drained}
    if not eligible:
        assert decision is None
    else:
        assert decision is not None and decision.node_id in eligible
        assert {c[0] for c in decision.candidates} == eligible


@given(node_views, study_uids, st.sampled_from([f"n{i}" for i in range(6)]))
def test_affinity_kept_while_the_node_is_eligible(nodes, study, affinity):
    decision = place(study, nodes, affinity, W)
    target = next((n for n in nodes if n.node_id == affinity), None)
    if target is not None and target.live and not target.drained:
        assert decision is not None and decision.node_id == affinity and decision.reason == "affinity"
    elif decision is not None:
        assert decision.node_id != affinity and decision.reason == "failover"


@given(node_views, study_uids)
def test_new_study_goes_to_a_least_loaded_node(nodes, study):
    decision = place(study, nodes, None, W)
    if decision is not None:
        best = min(score(n, W) for n in nodes if n.live and not n.drained)
        chosen = next(n for n in nodes if n.node_id == decision.node_id)
        assert score(chosen, W) <= best + W.tie
        assert decision.reason == "new_study"


def test_equal_nodes_share_new_studies_evenly():
    nodes = [NodeView(f"n{i}", live=True) for i in range(3)]
    counts = Counter(chosen(f"1.2.3.{i}", nodes, None, W).node_id for i in range(3000))
    assert set(counts) == {"n0", "n1", "n2"}
    assert all(800 <= c <= 1200 for c in counts.values()), counts


def test_same_study_same_choice_everywhere():
    nodes = [NodeView(f"n{i}", live=True) for i in range(4)]
    assert (
        len({chosen("1.2.840.99", list(reversed(nodes)) if i % 2 else nodes, None, W).node_id for i in range(10)}) == 1
    )


def test_load_moves_work_away():
    busy = NodeView("busy", live=True, pending_jobs=10)
    idle = NodeView("idle", live=True)
    assert chosen("1.2.3", [busy, idle], None, W).node_id == "idle"
    reserved = NodeView("idle", live=True, reserved=20)
    assert chosen("1.2.3", [busy, reserved], None, W).node_id == "busy"


def test_candidates_sorted_best_first_with_scores():
    nodes = [NodeView("a", live=True, pending_jobs=3), NodeView("b", live=True, pending_jobs=1)]
    decision = chosen("1.2.3", nodes, None, W)
    assert [c[0] for c in decision.candidates] == ["b", "a"]
    assert decision.candidates[0][1] < decision.candidates[1][1]


@given(st.integers(2, 6), st.lists(study_uids, min_size=30, max_size=60, unique=True))
def test_placement_placement_reservations_spread_a_burst_over_equal_nodes(n_nodes, studies):
    """Between two heartbeats, reservations keep a burst of new studies off a single idle node."""
    reserved = {f"n{i}": 0 for i in range(n_nodes)}
    for study in studies:
        nodes = [NodeView(n, live=True, reserved=r) for n, r in reserved.items()]
        decision = chosen(study, nodes, None, W)
        reserved[decision.node_id] += 1
    assert max(reserved.values()) - min(reserved.values()) <= 1


@given(node_views, study_uids, st.sets(st.sampled_from([f"n{i}" for i in range(6)])))
def test_placement_avoided_nodes_are_never_chosen(nodes, study, avoid):
    """Re-placement filters out the nodes that failed the instance before scoring."""
    decision = place(study, [n for n in nodes if n.node_id not in avoid], None, W)
    if decision is not None:
        assert decision.node_id not in avoid


def test_weights_are_the_configs_and_load_from_toml(tmp_path):
    from shared.config import Weights as ConfigWeights
    from shared.config import dump_toml, load_config

    assert Weights is ConfigWeights
    path = tmp_path / "s.toml"
    path.write_text("[scheduler.weights]\ncpu = 0.5\nrtt_ms = 0\n")
    cfg = load_config(path, env={})
    assert cfg.scheduler.weights == Weights(cpu=0.5, rtt_ms=0.0)
    # The generated config (what the local stack hands its children) reads back the same.
    path.write_text(dump_toml(cfg))
    assert load_config(path, env={}).scheduler.weights == cfg.scheduler.weights
    env = load_config(None, env={"SWITCHYARD_SCHEDULER__WEIGHTS": '{"pending_jobs": 2}'})
    assert env.scheduler.weights.pending_jobs == 2.0 and env.scheduler.weights.cpu == Weights().cpu
    # A heavier cpu weight moves a new study to the idle-cpu node.
    busy, idle = (
        NodeView("a", live=True, cpu_percent=90.0, pending_jobs=0),
        NodeView("b", live=True, cpu_percent=0.0, pending_jobs=1),
    )
    assert chosen("1.2", [busy, idle], None, Weights(cpu=0.0)).node_id == "a"
    assert chosen("1.2", [busy, idle], None, cfg.scheduler.weights).node_id == "b"
