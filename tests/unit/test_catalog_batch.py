"""Batched apply gives the same rows whatever the batch boundaries are."""

from __future__ import annotations

import pytest

from shared import events as ev
from shared.readmodel.catalog import CatalogStore
from tests.factories import mixed_log, received, rich_log
from tests.fixtures.util import dump_catalog


def test_any_batch_split_gives_the_same_store(tmp_path):
    log = mixed_log()
    one = CatalogStore(tmp_path / "one.duckdb")
    assert one.apply(log) == len(log)
    expected = dump_catalog(one)
    for size in (1, 2, 5):
        store = CatalogStore(tmp_path / f"split{size}.duckdb")
        for i in range(0, len(log), size):
            store.apply(log[i : i + size])
        assert dump_catalog(store) == expected, f"batches of {size}"


def test_batched_outcomes_follow_the_current_placement(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(mixed_log())
    cur = store.cursor()
    rows = {
        r[0]: r[1:] for r in cur.execute("SELECT sop_instance_uid, node_id, state, detail FROM locations").fetchall()
    }
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
        part = log[i : i + 3001]
        small.apply_raw([s for s, _ in part], [p for _, p in part])
    assert dump_catalog(small) == dump_catalog(one)
    assert one.rows("SELECT count(*) AS n FROM locations WHERE state = 'verified'")[0]["n"] == 6001


def bulk_loaded(path, log, size: int, before: int = 0, fold_bytes: int = 1 << 30) -> CatalogStore:
    """A store given ``before`` events batch by batch, then the rest as one bulk load in batches of ``size``."""
    store = CatalogStore(path)
    store.apply(log[:before])
    store.bulk_load(fold_bytes=fold_bytes)
    for i in range(before, len(log), size):
        store.apply(log[i : i + size])
    store.end_bulk_load()
    return store


def test_a_bulk_load_equals_batch_by_batch_transactions(tmp_path):
    log = rich_log()
    live = CatalogStore(tmp_path / "live.duckdb")
    for seq_event in log:
        live.apply([seq_event])  # the live projection, one event per transaction
    expected = dump_catalog(live)
    assert expected["projection_state"] == [("catalog", len(log))]
    for size in (1, 4, len(log)):
        assert dump_catalog(bulk_loaded(tmp_path / f"bulk{size}.duckdb", log, size)) == expected, f"batches of {size}"
    # bulk onto a store that already holds part of the log (upserts instead of plain inserts)
    assert dump_catalog(bulk_loaded(tmp_path / "resumed.duckdb", log, 3, before=13)) == expected
    # folds bounded in memory: after every batch (the first into empty tables, then upserts)
    assert dump_catalog(bulk_loaded(tmp_path / "folds.duckdb", log, 5, fold_bytes=1)) == expected


def test_nothing_of_a_bulk_load_is_visible_before_its_end(tmp_path):
    log = rich_log()
    store = CatalogStore(tmp_path / "c.duckdb")
    store.bulk_load()
    store.apply(log[:10])
    other = store.cursor()  # another connection: sees only committed data
    assert other.execute("SELECT count(*) FROM events").fetchone() == (0,)
    assert other.execute("SELECT count(*) FROM projection_state").fetchone() == (0,)
    store.end_bulk_load()
    assert other.execute("SELECT count(*) FROM events").fetchone() == (10,)
    assert store.last_seq() == 10


def test_a_malformed_message_rolls_a_bulk_load_back(tmp_path):
    from shared.readmodel.store import BulkRejected

    good = [ev.encode(e) for _, e in mixed_log()]
    bad_size = ev.encode(received(8)).replace(b'"size":108', b'"size":"big"')
    assert bad_size != ev.encode(received(8))
    # not UTF-8: the events rows refuse it at once; a bad size only the fold at the end
    for bad, at_end in ((b"\xff\xfe", False), (bad_size, True)):
        path = tmp_path / f"bulk{at_end}.duckdb"
        store = CatalogStore(path)
        store.bulk_load()
        store.apply_raw([1, 2, 3], good[:3])
        if at_end:
            store.apply_raw([4, 5], [bad, good[3]])
            with pytest.raises(BulkRejected):
                store.end_bulk_load()
        else:
            with pytest.raises(BulkRejected):
                store.apply_raw([4, 5], [bad, good[3]])
        store.close()
        store = CatalogStore(path)
        assert store.last_seq() == 0
        assert dump_catalog(store) == {t: [] for t in ("instances", "locations", "events", "projection_state")}
