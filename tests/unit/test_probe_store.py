"""The probe's verification store: expectations from the log, sightings from nodes, deadlines."""

from __future__ import annotations

from datetime import timedelta

from services.probe.store import Expected, ProbeStore
from services.probe.verify import failed_event, verified_event
from shared import events as ev
from tests.factories import forwarded_from as forwarded
from tests.factories import placed_on as placed


def test_forwarded_instance_is_checked_once_the_node_shows_it(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    p = placed("1.1")
    assert store.apply([(1, p), (2, forwarded(p))]) == 2
    assert store.ready_to_check("node1") == []
    store.record_changes("node1", [("1.1", "orthanc-a", 7, None)], 7)
    (item,) = store.ready_to_check("node1")
    assert (item.sop_instance_uid, item.dataset_digest, item.orthanc_id, item.placement_id) == (
        "1.1",
        "d1",
        "orthanc-a",
        p.event_id,
    )
    assert store.ready_to_check("node2") == []
    assert store.node_cursor("node1") == 7 and store.node_cursor("node2") == 0


def test_overdue_only_after_the_deadline_and_only_when_unseen(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    now = ev.utcnow()
    old, seen_old, fresh = placed("1.1"), placed("1.2"), placed("1.3")
    store.apply(
        [
            (1, old),
            (2, forwarded(old, now - timedelta(seconds=30))),
            (3, seen_old),
            (4, forwarded(seen_old, now - timedelta(seconds=30))),
            (5, fresh),
            (6, forwarded(fresh, now - timedelta(seconds=1))),
        ]
    )
    store.record_changes("node1", [("1.2", "o2", 1, None)], 1)
    assert [e.sop_instance_uid for e in store.overdue("node1", now, 10.0)] == ["1.1"]
    assert store.overdue("node1", now, 60.0) == []
    # The earliest unseen pending expectation sets when the next overdue check is due.
    assert store.next_due("node1", 60.0) == now - timedelta(seconds=30) + timedelta(seconds=60)
    assert store.next_due("node2", 60.0) is None


def test_the_generation_moves_with_every_write(tmp_path):
    """The probe skips its per-poll queries while it stands still: every kind of write must move it."""
    store = ProbeStore(tmp_path / "p.duckdb")
    p = placed("1.1")
    seen = [store.generation]
    store.apply([(1, p), (2, forwarded(p))])
    seen.append(store.generation)
    store.record_changes("node1", [("1.1", "o1", 1, "d1")], 1)
    seen.append(store.generation)
    (item,) = store.ready_to_check("node1")
    assert item.found_digest == "d1"
    seen.append(store.generation)  # a read: unchanged
    store.settle_many([("node1", "1.1", p.event_id, "verified", "")])
    seen.append(store.generation)
    assert seen[0] < seen[1] < seen[2] == seen[3] < seen[4]
    assert store.next_due("node1", 60.0) is None


def test_outcomes_on_the_log_close_expectations_so_a_restart_never_rejudges(tmp_path):
    path = tmp_path / "p.duckdb"
    store = ProbeStore(path)
    a, b = placed("1.1"), placed("1.2")
    store.apply([(1, a), (2, forwarded(a)), (3, b), (4, forwarded(b))])
    store.record_changes("node1", [("1.1", "o1", 1, None), ("1.2", "o2", 2, None)], 2)
    (item_a, item_b) = store.ready_to_check("node1")
    store.apply([(5, verified_event(item_a, "d1")), (6, failed_event(item_b, "dataset digest mismatch", "x"))])
    store.close()

    store = ProbeStore(path)
    assert store.last_seq() == 6 and store.node_cursor("node1") == 2
    assert store.ready_to_check("node1") == []
    assert store.states() == {("node1", "1.1"): "verified", ("node1", "1.2"): "failed"}
    # Re-applying old sequences changes nothing.
    assert store.apply([(2, forwarded(a))]) == 0
    assert store.states()[("node1", "1.1")] == "verified"


def test_a_new_placement_on_the_same_node_is_expected_again(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    first = placed("1.1")
    store.apply([(1, first), (2, forwarded(first))])
    store.record_changes("node1", [("1.1", "o1", 1, None)], 1)
    (item,) = store.ready_to_check("node1")
    store.settle_many([("node1", "1.1", item.placement_id, "failed", "dataset digest mismatch")])
    again = msgspec_replace(placed("1.1"), event_id="second-placement", attempt=1)
    store.apply([(3, again), (4, forwarded(again))])
    (item,) = store.ready_to_check("node1")
    assert item.placement_id == "second-placement"


def test_verification_events_have_deterministic_ids_and_their_own_subject():
    from shared.bus import subject_for

    p = placed("1.1")
    store_item = Expected("node1", "1.1", "1.2", p.event_id, "d1", ev.utcnow().replace(tzinfo=None))
    one, two = failed_event(store_item, "r"), failed_event(store_item, "r")
    assert one.event_id == two.event_id != verified_event(store_item, "d1").event_id
    assert subject_for(one) == "dicom.instance.verification_failed.node1"
    assert ev.decode(ev.encode(one)) == one


def msgspec_replace(event, **changes):
    import msgspec

    return msgspec.structs.replace(event, **changes)


def test_a_node_whose_change_log_restarts_forgets_what_it_showed(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    p = placed("1.1")
    store.apply([(1, p), (2, forwarded(p))])
    store.record_changes("node1", [("1.1", "old-id", 40, None)], 40)
    assert len(store.ready_to_check("node1")) == 1
    store.record_changes("node1", [], 0)  # a new database behind the same node
    assert store.ready_to_check("node1") == [] and store.node_cursor("node1") == 0
    store.record_changes("node1", [("1.1", "new-id", 1, None)], 1)
    (item,) = store.ready_to_check("node1")
    assert item.orthanc_id == "new-id"


def test_forwarded_and_dead_lettered_placements_are_not_kept(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    a, b = placed("1.1"), placed("1.2")
    dead = ev.InstanceDeadLetteredV1(
        event_id="d",
        sop_instance_uid="1.2",
        study_instance_uid="1.2",
        node_id="node1",
        placement_id=b.event_id,
        reason="refused",
    )
    store.apply([(1, a), (2, b), (3, forwarded(a)), (4, dead)])
    assert store.con.execute("SELECT count(*) FROM placements").fetchone() == (0,)
    assert store.states() == {("node1", "1.1"): "pending"}


def test_a_failed_verification_carries_what_a_re_placement_needs(tmp_path):
    """received_seq, attempt, avoid and pool go from the placement into the failure event."""
    store = ProbeStore(tmp_path / "p.duckdb")
    p = msgspec_replace(placed("1.1"), received_seq=42, attempt=1, avoid=["node3"], pool="archive")
    store.apply([(1, p), (2, forwarded(p, ev.utcnow() - timedelta(seconds=30)))])
    (item,) = store.overdue("node1", ev.utcnow(), 10.0)
    failed = failed_event(item, "not seen")
    assert (failed.received_seq, failed.attempt, failed.avoid, failed.pool) == (42, 1, ["node3"], "archive")
    store.record_changes("node1", [("1.1", "o1", 1, None)], 1)
    (item,) = store.ready_to_check("node1")
    assert (item.orthanc_id, item.received_seq, item.avoid) == ("o1", 42, ("node3",))


def test_a_store_file_from_before_re_placement_fields_opens(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE placements (placement_id VARCHAR PRIMARY KEY, sop_instance_uid VARCHAR,"
        " study_instance_uid VARCHAR, node_id VARCHAR, dataset_digest VARCHAR)"
    )
    con.execute(
        "CREATE TABLE expected (node_id VARCHAR, sop_instance_uid VARCHAR, study_instance_uid VARCHAR,"
        " placement_id VARCHAR, dataset_digest VARCHAR, forwarded_at TIMESTAMP, state VARCHAR,"
        " detail VARCHAR, PRIMARY KEY (node_id, sop_instance_uid))"
    )
    con.execute("INSERT INTO expected VALUES ('node1', '1.1', '1.2', 'p', 'd1', TIMESTAMP '2026-01-01', 'pending', '')")
    con.close()
    store = ProbeStore(path)
    (item,) = store.overdue("node1", ev.utcnow(), 10.0)
    # An expectation recorded before: not re-placeable (received_seq 0), still judged.
    assert (item.placement_id, item.received_seq, item.avoid, item.pool) == ("p", 0, (), "")


def test_a_rebuilt_store_carries_the_node_cursors_over(tmp_path):
    live = ProbeStore(tmp_path / "live.duckdb")
    live.record_changes("node1", [("1.1", "o1", 3, None), ("1.2", "o2", 5, None)], 5)
    live.record_changes("node2", [], 9)
    live.close()
    fresh = ProbeStore(tmp_path / "fresh.duckdb")
    assert fresh.carry_node_state(tmp_path / "live.duckdb")
    assert (fresh.node_cursor("node1"), fresh.node_cursor("node2")) == (5, 9)
    p = placed("1.2")
    fresh.apply([(1, p), (2, forwarded(p))])
    assert [(e.sop_instance_uid, e.orthanc_id) for e in fresh.ready_to_check("node1")] == [("1.2", "o2")]
    # A missing or unreadable live file carries nothing: the nodes are read from the start.
    assert not ProbeStore(tmp_path / "other.duckdb").carry_node_state(tmp_path / "missing.duckdb")
    (tmp_path / "junk.duckdb").write_bytes(b"not a database")
    empty = ProbeStore(tmp_path / "empty.duckdb")
    assert not empty.carry_node_state(tmp_path / "junk.duckdb")
    assert empty.node_cursor("node1") == 0


def dump(store: ProbeStore) -> dict[str, list]:
    return {
        t: store.con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
        for t in ("projection_state", "placements", "expected")
    }


def test_any_split_into_batches_gives_the_same_rows(tmp_path):
    """The batch fold equals event-by-event application, whatever the batch boundaries."""
    now = ev.utcnow()
    a, b, c, d = placed("1.1"), placed("1.2"), placed("1.3"), placed("1.4", node="node2")
    a2 = msgspec_replace(placed("1.1"), event_id="a-again", attempt=1)
    fa, fb, fd, fa2 = (forwarded(p, now - timedelta(seconds=i)) for i, p in enumerate((a, b, d, a2)))
    item = lambda p: Expected(p.node_id, p.sop_instance_uid, "1.2", p.event_id, p.dataset_digest, now)  # noqa: E731
    log = [
        a,
        b,
        c,
        fa,
        d,
        fb,
        failed_event(item(a), "dataset digest mismatch", "x"),
        a2,
        fa2,
        verified_event(item(a), "d1"),  # an outcome of the older placement: the newer one stays pending
        ev.InstanceDeadLetteredV1(
            event_id="dl",
            sop_instance_uid="1.3",
            study_instance_uid="1.2",
            node_id="node1",
            placement_id=c.event_id,
            reason="refused",
        ),
        fd,
        verified_event(item(b), "d1"),
        msgspec_replace(verified_event(item(d), "d1"), placement_id=""),
    ]  # pre-placement-id event: ignored
    seqs = list(enumerate(log, start=1))
    whole = ProbeStore(tmp_path / "whole.duckdb")
    assert whole.apply(seqs) == len(log)
    assert whole.states() == {("node1", "1.1"): "pending", ("node1", "1.2"): "verified", ("node2", "1.4"): "pending"}
    assert whole.con.execute("SELECT count(*) FROM placements").fetchone() == (0,)
    for size in (1, 2, 3, 5):
        split = ProbeStore(tmp_path / f"split{size}.duckdb")
        for i in range(0, len(seqs), size):
            split.apply(seqs[i : i + size])
        assert dump(split) == dump(whole), size


def test_a_poll_s_sightings_and_outcomes_are_written_in_one_statement_each(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    a, b, c = placed("1.1"), placed("1.2"), placed("1.3")
    store.apply([(1, a), (2, b), (3, c), (4, forwarded(a)), (5, forwarded(b)), (6, forwarded(c))])
    # The same SOP twice in one read of /changes: the later sighting wins.
    store.record_changes("node1", [("1.1", "old", 1, None), ("1.2", "o2", 2, None), ("1.1", "o1", 3, None)], 3)
    assert sorted((e.sop_instance_uid, e.orthanc_id) for e in store.ready_to_check("node1")) == [
        ("1.1", "o1"),
        ("1.2", "o2"),
    ]
    store.settle_many(
        [
            ("node1", "1.1", a.event_id, "verified", ""),
            ("node1", "1.2", b.event_id, "failed", "dataset digest mismatch"),
            ("node1", "1.3", "another-placement", "verified", ""),
        ]
    )  # not the current one: no change
    assert store.states() == {("node1", "1.1"): "verified", ("node1", "1.2"): "failed", ("node1", "1.3"): "pending"}
    assert store.node_cursor("node1") == 3


def test_a_later_sighting_of_the_same_instance_replaces_the_earlier(tmp_path):
    store = ProbeStore(tmp_path / "p.duckdb")
    p = placed("1.1")
    store.apply([(1, p), (2, forwarded(p))])
    store.record_changes("node1", [("1.1", "o1", 1, "d1")], 1)
    store.record_changes("node1", [("1.1", "o1b", 2, "d2")], 2)  # deleted and stored anew on the node
    (item,) = store.ready_to_check("node1")
    assert (item.orthanc_id, item.found_digest, store.node_cursor("node1")) == ("o1b", "d2", 2)
