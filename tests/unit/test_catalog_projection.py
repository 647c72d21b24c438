"""The catalog projection: rows and last sequence together, idempotent, rebuildable."""

from __future__ import annotations

import msgspec
import pytest

from shared import events as ev
from shared.readmodel.catalog import BatchRejected, CatalogStore
from tests.factories import fanned_out, forwarded, log_of_two, placed, received, verification_failed
from tests.fixtures.util import dump_catalog


def test_apply_records_rows_and_sequence_together(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    assert store.apply(log_of_two()) == 7
    assert store.last_seq() == 7
    rows = dict(store.cursor().execute("SELECT sop_instance_uid, state FROM locations").fetchall())
    assert rows == {"1.2.9.1": "forwarded", "1.2.9.2": "dead_lettered"}


def test_reapplying_is_a_no_op(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(log_of_two())
    before = dump_catalog(store)
    assert store.apply(log_of_two()) == 0
    assert dump_catalog(store) == before


def test_batches_and_reopen_equal_a_single_rebuild(tmp_path):
    log = log_of_two()
    live = CatalogStore(tmp_path / "live.duckdb")
    live.apply(log[:3])
    live.close()
    live = CatalogStore(tmp_path / "live.duckdb")  # resume after a restart
    live.apply(log[live.last_seq() :])
    rebuilt = CatalogStore(tmp_path / "rebuilt.duckdb")
    rebuilt.apply(log)
    assert dump_catalog(live) == dump_catalog(rebuilt)


def test_stale_outcome_does_not_touch_a_newer_placement(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(
        [(1, received(1)), (2, placed(1, "node1")), (3, placed(1, "node2", attempt=1)), (4, forwarded(1, "node1"))]
    )
    row = store.cursor().execute("SELECT node_id, state FROM locations").fetchone()
    assert row == ("node2", "placed")


def test_failed_batch_leaves_nothing(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply([(1, received(1))])

    bad = received(2)
    bad.size = "not a number"  # type: ignore[assignment]
    with pytest.raises(BatchRejected):
        store.apply([(2, received(3)), (3, bad)])
    assert store.last_seq() == 1
    assert store.cursor().execute("SELECT count(*) FROM instances").fetchone() == (1,)


def test_fan_out_keeps_one_location_per_pool(tmp_path):
    """One instance placed in two pools has two locations; each moves with its own placement."""

    def fwd(node, pool, attempt=0):
        return msgspec.structs.replace(
            forwarded(1, node, attempt), event_id=f"f-{pool}-{attempt}", placement_id=f"p1-{pool}-{attempt}"
        )

    log = [
        (1, received(1)),
        (2, fanned_out(1, "node1", "archive")),
        (3, fanned_out(1, "node2", "research")),
        (4, fwd("node1", "archive")),
        (
            5,
            ev.InstanceVerificationFailedV1(
                event_id="vf",
                sop_instance_uid="1.2.9.1",
                study_instance_uid="1.2.9",
                node_id="node1",
                placement_id="p1-archive-0",
                reason="mismatch",
            ),
        ),
        (6, fanned_out(1, "node3", "archive", attempt=1)),
        (7, fwd("node2", "research")),
        (
            8,
            ev.InstanceVerifiedV1(
                event_id="v",
                sop_instance_uid="1.2.9.1",
                node_id="node2",
                dataset_digest="d",
                placement_id="p1-research-0",
            ),
        ),
    ]
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(log[:5])
    rows = store.rows("SELECT pool, node_id, state FROM locations ORDER BY pool")
    assert rows == [
        {"pool": "archive", "node_id": "node1", "state": "verification_failed"},
        {"pool": "research", "node_id": "node2", "state": "placed"},
    ]
    store.apply(log[5:])
    assert store.rows("SELECT pool, node_id, state FROM locations ORDER BY pool") == [
        {"pool": "archive", "node_id": "node3", "state": "placed"},
        {"pool": "research", "node_id": "node2", "state": "verified"},
    ]
    one_batch = CatalogStore(tmp_path / "r.duckdb")
    one_batch.apply(log)
    assert dump_catalog(one_batch) == dump_catalog(store)


def test_a_file_from_before_pools_is_rekeyed(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE locations (sop_instance_uid VARCHAR PRIMARY KEY, study_instance_uid VARCHAR,"
        " node_id VARCHAR, state VARCHAR, placement_id VARCHAR, reason VARCHAR, detail VARCHAR,"
        " updated_seq BIGINT, updated_at TIMESTAMP)"
    )
    con.execute(
        "INSERT INTO locations VALUES ('1.2.9.1', '1.2.9', 'node1', 'placed', 'p1-0', 'new_study', '',"
        " 2, TIMESTAMP '2026-01-01 00:00:00')"
    )
    con.close()
    store = CatalogStore(path)
    assert store.rows("SELECT sop_instance_uid, pool, state FROM locations") == [
        {"sop_instance_uid": "1.2.9.1", "pool": "", "state": "placed"}
    ]
    store.apply([(3, forwarded(1, "node1")), (4, fanned_out(1, "node2", "research"))])
    assert store.rows("SELECT pool, state FROM locations ORDER BY pool") == [
        {"pool": "", "state": "forwarded"},
        {"pool": "research", "state": "placed"},
    ]


def test_failed_verification_is_a_location_state(tmp_path):
    log = list(
        enumerate([received(1), placed(1, "node1"), forwarded(1, "node1"), verification_failed(1, "node1")], start=1)
    )
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(log[:3])
    store.apply(log[3:])  # a later batch: the row is read back
    row = store.cursor().execute("SELECT node_id, state, detail, updated_seq FROM locations").fetchone()
    assert row == ("node1", "verification_failed", "dataset digest mismatch", 4)
    rebuilt = CatalogStore(tmp_path / "r.duckdb")
    rebuilt.apply(log)  # the same log in one batch (a rebuild) gives the same rows
    assert dump_catalog(rebuilt) == dump_catalog(store)


def test_failed_verification_of_an_older_placement_leaves_the_current_one(tmp_path):
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply(
        [
            (1, received(1)),
            (2, placed(1, "node1")),
            (3, forwarded(1, "node1")),
            (4, placed(1, "node1", attempt=1)),
            (5, verification_failed(1, "node1", attempt=0)),
        ]
    )
    assert store.cursor().execute("SELECT state, placement_id FROM locations").fetchone() == ("placed", "p1-1")


def test_raw_events_are_stored_as_sent_and_fold_like_decoded_ones(tmp_path):
    log = log_of_two()
    raw = CatalogStore(tmp_path / "raw.duckdb")
    payloads = [ev.encode(e) for _, e in log]
    assert raw.apply_raw([seq for seq, _ in log], payloads) == len(log)
    decoded = CatalogStore(tmp_path / "decoded.duckdb")
    decoded.apply(log)
    assert dump_catalog(raw) == dump_catalog(decoded)
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
    tail = tail[tail.index(b'"') :]
    payloads = [
        head + b'"occurred_at":"2026-01-01T01:30:00+01:00' + tail,
        head.replace(b'"r1"', b'"r2"') + b'"occurred_at":"2026-01-01T00:30:00' + tail,
    ]
    store.apply_raw([1, 2], payloads)
    rows = store.cursor().execute("SELECT CAST(occurred_at AS VARCHAR) FROM events ORDER BY seq").fetchall()
    assert rows == [("2026-01-01 00:30:00",), ("2026-01-01 00:30:00",)]


def test_payloads_in_another_key_order_or_spacing_fold_like_encoded_ones(tmp_path):
    """Only the encoder's form ("type" first, no spaces) is typed from its prefix; any other is parsed."""
    import json

    log = log_of_two()
    encoded = CatalogStore(tmp_path / "encoded.duckdb")
    encoded.apply(log)
    other = CatalogStore(tmp_path / "other.duckdb")
    payloads = [
        json.dumps(json.loads(ev.encode(e)), sort_keys=True, separators=(",", ":")).encode()
        if seq % 2
        else json.dumps(json.loads(ev.encode(e))).encode()
        for seq, e in log
    ]
    assert not any(p.startswith(b'{"type":"') for p in payloads)
    assert other.apply_raw([seq for seq, _ in log], payloads) == len(log)
    tables = dump_catalog(encoded)
    del tables["events"]  # its payloads are stored as sent
    assert {t: rows for t, rows in dump_catalog(other).items() if t != "events"} == tables
    assert [r[:7] for r in dump_catalog(other)["events"]] == [r[:7] for r in dump_catalog(encoded)["events"]]


def test_patient_study_and_series_levels_follow_the_instances(tmp_path):
    """The patients, studies and series views aggregate what instances hold, batch by batch."""
    store = CatalogStore(tmp_path / "c.duckdb")
    events = [received(1), received(2), received(3, study="1.2.8")]
    store.apply(enumerate(events, start=1))
    rows = store.rows(
        "SELECT study_instance_uid, patient_id, modalities, series, instances, bytes FROM studies ORDER BY 1"
    )
    assert rows == [
        {
            "study_instance_uid": "1.2.8",
            "patient_id": "DEMO01",
            "modalities": "CT",
            "series": 1,
            "instances": 1,
            "bytes": 103,
        },
        {
            "study_instance_uid": "1.2.9",
            "patient_id": "DEMO01",
            "modalities": "CT",
            "series": 1,
            "instances": 2,
            "bytes": 203,
        },
    ]
    assert store.rows("SELECT patient_id, studies, instances FROM patients") == [
        {"patient_id": "DEMO01", "studies": 2, "instances": 3}
    ]
    assert store.rows("SELECT series_instance_uid, study_instance_uid, instances FROM series ORDER BY 1") == [
        {"series_instance_uid": "1.2.8.1", "study_instance_uid": "1.2.8", "instances": 1},
        {"series_instance_uid": "1.2.9.1", "study_instance_uid": "1.2.9", "instances": 2},
    ]
    store.apply([(4, received(4, study="1.2.8"))])  # a later batch moves the levels with it
    assert store.rows("SELECT instances FROM studies WHERE study_instance_uid = '1.2.8'") == [{"instances": 2}]


def test_versions_count_new_content_under_one_sop_whatever_the_batching(tmp_path):
    """The same SOP Instance UID re-sent: a new digest is a new version, the same digest is not."""

    def again(event_id: str, digest: str) -> ev.InstanceReceivedV1:
        return msgspec.structs.replace(received(1), event_id=event_id, dataset_digest=digest)

    log = [
        (1, received(1)),
        (2, received(2)),
        (3, again("r1b", "b" * 64)),
        (4, again("r1c", "b" * 64)),
        (5, again("r1d", "c" * 64)),
    ]
    stores = {}
    for split in (1, 2, 3, 5):
        store = stores[split] = CatalogStore(tmp_path / f"{split}.duckdb")
        store.apply(log[:split])
        store.apply(log[split:])
    rows = {
        split: dict(s.cursor().execute("SELECT sop_instance_uid, versions FROM instances").fetchall())
        for split, s in stores.items()
    }
    assert all(r == {"1.2.9.1": 3, "1.2.9.2": 1} for r in rows.values()), rows
    latest = (
        stores[1]
        .cursor()
        .execute("SELECT dataset_digest, received_seq FROM instances WHERE sop_instance_uid = '1.2.9.1'")
        .fetchone()
    )
    assert latest == ("c" * 64, 5)


def test_a_resend_is_in_the_events_but_changes_no_instance_or_location(tmp_path):
    from tests.factories import resent

    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply([(1, received(1)), (2, placed(1, "node1")), (3, forwarded(1, "node1"))])
    before = {t: rows for t, rows in dump_catalog(store).items() if t in ("instances", "locations")}
    store.apply([(4, resent(1, "OTHERAE")), (5, resent(1, "OTHERAE", "a2"))])
    assert {t: rows for t, rows in dump_catalog(store).items() if t in ("instances", "locations")} == before
    rows = (
        store.cursor().execute("SELECT type, sop_instance_uid, study_instance_uid FROM events WHERE seq > 3").fetchall()
    )
    assert rows == [("instance.resent.v1", "1.2.9.1", "1.2.9")] * 2
