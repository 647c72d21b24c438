"""Batched apply gives the same rows whatever the batch boundaries are."""

from __future__ import annotations

from services.catalog.projection import CatalogStore
from shared import events as ev
from tests.unit.test_catalog_projection import dump, forwarded, placed, received


def mixed_log() -> list[tuple[int, ev.Event]]:
    events: list[ev.Event] = []
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
        ev.InstanceForwardFailedV1(event_id="ff3", sop_instance_uid="1.2.9.3", study_instance_uid="1.2.9",
                                   node_id="node1", placement_id="p3-0", reason="timeout"),
        ev.NodeStateChangedV1(event_id="ns1", node_id="node3", state="drained", reason="maintenance"),
        received(3),  # a re-received instance replaces its header row
        ev.InstanceDeadLetteredV1(event_id="dl3", sop_instance_uid="1.2.9.3", study_instance_uid="1.2.9",
                                  node_id="node1", placement_id="p3-0", reason="gave up"),
        ev.NodeStateChangedV1(event_id="ns2", node_id="node3", state="undrained"),
        ev.InstanceVerifiedV1(event_id="v9", sop_instance_uid="1.2.9.99", node_id="node1", dataset_digest="d"),
    ]
    return list(enumerate(events, start=1))


def test_any_batch_split_gives_the_same_store(tmp_path):
    log = mixed_log()
    one = CatalogStore(tmp_path / "one.duckdb")
    assert one.apply(log) == len(log)
    expected = dump(one)
    for size in (1, 2, 5):
        store = CatalogStore(tmp_path / f"split{size}.duckdb")
        for i in range(0, len(log), size):
            store.apply(log[i:i + size])
        assert dump(store) == expected, f"batches of {size}"


def test_batched_outcomes_follow_the_current_placement(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(mixed_log())
    cur = store.cursor()
    rows = {r[0]: r[1:] for r in cur.execute("SELECT sop_instance_uid, node_id, state, detail FROM locations").fetchall()}
    assert rows["1.2.9.1"] == ("node1", "verified", "")
    assert rows["1.2.9.2"] == ("node2", "forwarded", "")
    assert rows["1.2.9.3"] == ("node1", "dead_lettered", "gave up")
    assert rows["1.2.9.4"] == ("node1", "placed", "")
    assert "1.2.9.99" not in rows
    assert cur.execute("SELECT state, reason, updated_seq FROM nodes").fetchall() == [("undrained", "", 23)]
    assert cur.execute("SELECT count(*) FROM events").fetchone() == (24,)
    assert cur.execute("SELECT received_seq FROM instances WHERE sop_instance_uid = '1.2.9.3'").fetchone() == (21,)


def test_a_batch_of_many_record_batches_equals_small_batches(tmp_path):
    """Above one Arrow record batch DuckDB scans in parallel: the result must not depend on it."""
    from tests.bench.catalog import instance_events

    events = [e for i in range(6000) for e in instance_events(i)] + [e for _, e in mixed_log()]
    log = [(seq, ev.encode(e)) for seq, e in enumerate(events, start=1)]
    one = CatalogStore(tmp_path / "one.duckdb")
    assert one.apply_raw([s for s, _ in log], [p for _, p in log]) == len(log)
    small = CatalogStore(tmp_path / "small.duckdb")
    for i in range(0, len(log), 3001):
        part = log[i:i + 3001]
        small.apply_raw([s for s, _ in part], [p for _, p in part])
    assert dump(small) == dump(one)
    assert one.rows("SELECT count(*) AS n FROM locations WHERE state = 'verified'")[0]["n"] == 6001
