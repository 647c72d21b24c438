"""What every projection store promises the replay and the live follower (shared.readmodel.store).

Each case runs over both stores, on real DuckDB files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from services.probe.store import ProbeStore
from shared import events as ev
from shared.readmodel.catalog import CatalogStore
from shared.readmodel.store import BulkLoading, ProjectionStore
from tests.factories import forwarded, placed, received

STORES: dict[str, Callable[[Path], ProjectionStore]] = {"catalog": CatalogStore, "probe": ProbeStore}


@pytest.fixture(params=sorted(STORES))
def open_store(request, tmp_path):
    opened: list[ProjectionStore] = []

    def open_(name: str = "store.duckdb") -> ProjectionStore:
        store = STORES[request.param](tmp_path / name)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        try:
            store.close()
        except duckdb.Error:
            pass


def a_log() -> list[tuple[int, ev.Event]]:
    """Two instances received, placed and forwarded: rows in every table of both stores."""
    events = [
        received(1),
        received(2),
        placed(1, "node1"),
        placed(2, "node2"),
        forwarded(1, "node1"),
        forwarded(2, "node2"),
    ]
    return list(enumerate(events, start=1))


def dump(store) -> dict[str, list]:
    """Every table's rows, in order."""
    cur = store.con.cursor()
    tables = [
        r[0]
        for r in cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1"
        ).fetchall()
    ]
    return {t: cur.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}


def refuse_last_seq_from(store, seq: int) -> None:
    """Make storing a resume position >= ``seq`` fail: the last statement of a batch's transaction."""
    con = store.con
    con.execute(f"CREATE TABLE guarded (name VARCHAR PRIMARY KEY, last_seq BIGINT NOT NULL CHECK (last_seq < {seq}))")
    con.execute("INSERT INTO guarded SELECT * FROM projection_state")
    con.execute("DROP TABLE projection_state")
    con.execute("ALTER TABLE guarded RENAME TO projection_state")


def test_a_fresh_store_starts_at_zero(open_store):
    store = open_store()
    assert store.last_seq() == 0
    assert dump(store)["projection_state"] == []


def test_rows_and_the_resume_position_are_written_together(open_store):
    store = open_store()
    log = a_log()
    assert store.apply(log[:3]) == 3
    assert store.last_seq() == 3
    first = dump(store)
    refuse_last_seq_from(store, 4)
    with pytest.raises(duckdb.ConstraintException):
        store.apply(log[3:])
    assert store.last_seq() == 3
    assert dump(store) == first  # the batch's rows were rolled back with its position


def test_a_failed_raw_batch_leaves_everything_as_it_was(open_store):
    store = open_store()
    log = a_log()
    store.apply(log[:2])
    before = dump(store)
    refuse_last_seq_from(store, 3)
    with pytest.raises(duckdb.ConstraintException):
        store.apply_raw([seq for seq, _ in log[2:]], [ev.encode(e) for _, e in log[2:]])
    assert store.last_seq() == 2
    assert dump(store) == before


def test_reapplying_what_is_applied_is_a_no_op(open_store):
    store = open_store()
    log = a_log()
    store.apply(log)
    before = dump(store)
    assert store.apply(log) == 0
    assert store.apply(log[:2]) == 0
    assert store.apply_raw([seq for seq, _ in log], [ev.encode(e) for _, e in log]) == 0
    assert dump(store) == before


def test_an_overlapping_batch_applies_only_what_is_new(open_store):
    store = open_store()
    log = a_log()
    store.apply(log[:4])
    assert store.apply(log[2:]) == 2
    whole = open_store("whole.duckdb")
    whole.apply(log)
    assert dump(store) == dump(whole)


def test_reopening_keeps_the_position_and_rows(open_store, tmp_path):
    store = open_store()
    store.apply(a_log()[:4])
    before = dump(store)
    store.close()
    again = open_store()
    assert again.last_seq() == 4
    assert dump(again) == before


def test_raw_and_decoded_batches_give_the_same_store(open_store):
    log = a_log()
    decoded = open_store("decoded.duckdb")
    decoded.apply(log)
    raw = open_store("raw.duckdb")
    for part in (log[:2], log[2:5], log[5:]):
        raw.apply_raw([seq for seq, _ in part], [ev.encode(e) for _, e in part])
    assert raw.last_seq() == decoded.last_seq() == 6
    assert dump(raw) == dump(decoded)


def test_an_undecodable_message_is_skipped_and_the_rest_applied(open_store, caplog):
    log = a_log()
    store = open_store()
    payloads = [ev.encode(e) for _, e in log]
    payloads[2] = b'{"type":"instance.placed.v1","event_id":'  # cut short
    store.apply_raw([seq for seq, _ in log], payloads)
    assert store.last_seq() == 6
    assert "undecodable message at stream seq 3" in caplog.text
    without = open_store("without.duckdb")
    without.apply([(seq, e) for seq, e in log if seq != 3])
    assert dump(store) == dump(without)


def test_only_the_catalog_offers_a_bulk_load(tmp_path):
    """The rebuild asks the Protocol, not hasattr: the catalog loads in one transaction, the probe batch by batch."""
    catalog, probe = CatalogStore(tmp_path / "c.duckdb"), ProbeStore(tmp_path / "p.duckdb")
    try:
        assert isinstance(catalog, BulkLoading)
        assert not isinstance(probe, BulkLoading)
    finally:
        catalog.close()
        probe.close()
