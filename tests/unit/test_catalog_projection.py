"""The catalog projection: rows and last sequence together, idempotent, rebuildable."""

from __future__ import annotations

import pytest

from services.catalog.projection import CatalogStore
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


def log_of_two() -> list[tuple[int, ev.Event]]:
    events = [received(1), received(2), placed(1, "node1"), placed(2, "node1"), forwarded(1, "node1"),
              ev.InstanceForwardFailedV1(event_id="x", sop_instance_uid="1.2.9.2", study_instance_uid="1.2.9",
                                         node_id="node1", placement_id="p2-0", reason="refused", permanent=True),
              ev.InstanceDeadLetteredV1(event_id="y", sop_instance_uid="1.2.9.2", study_instance_uid="1.2.9",
                                        node_id="node1", placement_id="p2-0", reason="refused after 1")]
    return list(enumerate(events, start=1))


def dump(store: CatalogStore) -> dict[str, list]:
    cur = store.cursor()
    return {t: cur.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
            for t in ("instances", "locations", "events", "projection_state")}


def test_apply_records_rows_and_sequence_together(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    assert store.apply(log_of_two()) == 7
    assert store.last_seq() == 7
    rows = dict(store.cursor().execute("SELECT sop_instance_uid, state FROM locations").fetchall())
    assert rows == {"1.2.9.1": "forwarded", "1.2.9.2": "dead_lettered"}


def test_reapplying_is_a_no_op(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(log_of_two())
    before = dump(store)
    assert store.apply(log_of_two()) == 0
    assert dump(store) == before


def test_batches_and_reopen_equal_a_single_rebuild(tmp_path):
    log = log_of_two()
    live = CatalogStore(tmp_path / "live.duckdb")
    live.apply(log[:3])
    live.close()
    live = CatalogStore(tmp_path / "live.duckdb")  # resume after a restart
    live.apply(log[live.last_seq():])
    rebuilt = CatalogStore(tmp_path / "rebuilt.duckdb")
    rebuilt.apply(log)
    assert dump(live) == dump(rebuilt)


def test_stale_outcome_does_not_touch_a_newer_placement(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply([(1, received(1)), (2, placed(1, "node1")), (3, placed(1, "node2", attempt=1)),
                 (4, forwarded(1, "node1"))])
    row = store.cursor().execute("SELECT node_id, state FROM locations").fetchone()
    assert row == ("node2", "placed")


def test_failed_batch_leaves_nothing(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply([(1, received(1))])


    bad = received(2)
    bad.size = "not a number"  # type: ignore[assignment]
    with pytest.raises(Exception):
        store.apply([(2, received(3)), (3, bad)])
    assert store.last_seq() == 1
    assert store.cursor().execute("SELECT count(*) FROM instances").fetchone() == (1,)


def test_raw_events_are_stored_as_sent_and_fold_like_decoded_ones(tmp_path):
    log = log_of_two()
    raw = CatalogStore(tmp_path / "raw.duckdb")
    payloads = [ev.encode(e) for _, e in log]
    assert raw.apply_raw([seq for seq, _ in log], payloads) == len(log)
    decoded = CatalogStore(tmp_path / "decoded.duckdb")
    decoded.apply(log)
    assert dump(raw) == dump(decoded)
    stored = raw.cursor().execute("SELECT CAST(payload AS VARCHAR) FROM events ORDER BY seq").fetchall()
    assert [row[0].encode() for row in stored] == payloads


def test_undecodable_messages_are_skipped_and_the_sequence_moves_on(tmp_path, caplog):
    store = CatalogStore(tmp_path / "c.duckdb")
    good = ev.encode(received(1))
    not_json = b'{"type": "instance.received.v1", '
    unknown = b'{"type":"instance.teleported.v1","event_id":"t"}'
    bad_size = good.replace(b'"size":101', b'"size":"big"')
    assert bad_size != good
    assert store.apply_raw([1, 2, 3, 4, 5], [not_json, good, unknown, bad_size, b"\xff\xfe"]) == 1
    assert store.last_seq() == 5
    assert store.cursor().execute("SELECT seq, event_id FROM events").fetchall() == [(2, "r1")]
    skipped = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert skipped == [f"undecodable message at stream seq {s}; skipped" for s in (1, 3, 4, 5)]


def test_event_times_are_stored_in_utc(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    event = ev.encode(received(1)).replace(b'"occurred_at":"', b'"occurred_at":"X')
    head, tail = event.split(b'"occurred_at":"X', 1)
    tail = tail[tail.index(b'"'):]
    payloads = [head + b'"occurred_at":"2026-01-01T01:30:00+01:00' + tail,
                head.replace(b'"r1"', b'"r2"') + b'"occurred_at":"2026-01-01T00:30:00' + tail]
    store.apply_raw([1, 2], payloads)
    rows = store.cursor().execute("SELECT CAST(occurred_at AS VARCHAR) FROM events ORDER BY seq").fetchall()
    assert rows == [("2026-01-01 00:30:00",), ("2026-01-01 00:30:00",)]
