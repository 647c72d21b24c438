"""Audit export: the window is half-open and both formats hold the same rows."""

from __future__ import annotations

import enum
import typing
from datetime import UTC, datetime

import duckdb
import msgspec
import pytest

from services.catalog.audit import SUBJECTS, ExportError, export, parse_when
from shared import events as ev
from shared.bus import subject_for
from shared.readmodel.catalog import CatalogStore
from switchyard import cli
from tests.factories import forwarded, placed, received


def at(hour: int) -> datetime:
    return datetime(2026, 3, 1, hour, tzinfo=UTC)


def store_with_hours(path) -> None:
    log = []
    for n, hour in ((1, 8), (2, 10), (3, 12)):
        r, p, f = received(n), placed(n, "node1"), forwarded(n, "node1")
        for e in (r, p, f):
            e.occurred_at = at(hour)
        log += [r, p, f]
    store = CatalogStore(path)
    store.apply(list(enumerate(log, start=1)))
    store.close()


def test_export_writes_the_window_as_parquet_and_csv(tmp_path):
    db = tmp_path / "c.duckdb"
    store_with_hours(db)
    result = export(db, parse_when("2026-03-01T09:00"), parse_when("2026-03-01T12:00:00+00:00"), tmp_path / "out")
    assert (result.events, result.instances) == (3, 1)
    con = duckdb.connect()
    pq = con.execute(f"SELECT seq, type FROM '{tmp_path}/out/events.parquet' ORDER BY seq").fetchall()
    assert pq == [(4, "instance.received.v1"), (5, "instance.placed.v1"), (6, "instance.forwarded.v1")]
    csv = con.execute(f"SELECT seq FROM read_csv('{tmp_path}/out/events.csv') ORDER BY seq").fetchall()
    assert csv == [(4,), (5,), (6,)]
    inst = con.execute(f"SELECT sop_instance_uid, node_id, state FROM '{tmp_path}/out/instances.parquet'").fetchall()
    assert inst == [("1.2.9.2", "node1", "forwarded")]


def test_cli_export_and_bad_windows(tmp_path, capsys):
    db = tmp_path / "c.duckdb"
    store_with_hours(db)
    out = tmp_path / "cli-out"
    assert (
        cli.main(
            ["audit", "export", "--db", str(db), "--since", "2026-03-01", "--until", "2026-03-02", "--out", str(out)]
        )
        == 0
    )
    assert "9 events, 3 instances" in capsys.readouterr().out
    assert (out / "instances.csv").exists()
    assert (
        cli.main(
            ["audit", "export", "--db", str(db), "--since", "yesterday", "--until", "2026-03-02", "--out", str(out)]
        )
        == 1
    )
    assert "ISO 8601" in capsys.readouterr().err
    with pytest.raises(ExportError, match="after"):
        export(db, at(12), at(8), out)
    with pytest.raises(ExportError, match="no catalog database"):
        export(tmp_path / "missing.duckdb", at(8), at(12), out)


def test_rebuild_without_nats_fails_cleanly_and_keeps_the_file(tmp_path, capsys):
    from tests.fixtures.util import free_port

    db = tmp_path / "c.duckdb"
    store_with_hours(db)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[nats]\nurl = "nats://127.0.0.1:{free_port()}"\nconnect_timeout_s = 0.5\nallow_unauthenticated = true\n'
    )
    assert cli.main(["--config", str(config), "catalog", "rebuild", "--db", str(db)]) == 1
    assert "cannot read the log" in capsys.readouterr().err
    assert not (tmp_path / "c.duckdb.rebuild").exists()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (9,)


def test_export_has_provenance_columns(tmp_path):
    db = tmp_path / "c.duckdb"
    r = msgspec.structs.replace(
        received(1), calling_ae="MODALITY1", called_ae="SWITCHYARD", peer_address="192.0.2.7", peer_port=40123
    )
    log = [r, placed(1, "node2"), forwarded(1, "node2")]
    store = CatalogStore(db)
    store.apply(list(enumerate(log, start=1)))
    store.close()
    export(db, parse_when("2000-01-01"), parse_when("2100-01-01"), tmp_path / "out")
    con = duckdb.connect()
    for fmt in ("parquet", "csv"):
        rows = con.execute(
            "SELECT type, subject, calling_ae, called_ae, peer_address, peer_port"
            f" FROM '{tmp_path}/out/events.{fmt}' ORDER BY seq"
        ).fetchall()
        assert rows == [
            ("instance.received.v1", "dicom.instance.received", "MODALITY1", "SWITCHYARD", "192.0.2.7", 40123),
            ("instance.placed.v1", "dicom.instance.placed.node2", None, None, None, None),
            ("instance.forwarded.v1", "dicom.instance.forwarded.node2", None, None, None, None),
        ]
        inst = con.execute(
            f"SELECT subject, calling_ae, called_ae, peer_address, peer_port FROM '{tmp_path}/out/instances.{fmt}'"
        ).fetchall()
        assert inst == [("dicom.instance.received", "MODALITY1", "SWITCHYARD", "192.0.2.7", 40123)]


def _one_of(kind: type) -> ev.Event:
    """An event of ``kind`` with every required field filled (node_id = node1)."""
    values: dict[str, object] = {}
    for f in msgspec.structs.fields(kind):
        if f.required and isinstance(f.type, type) and issubclass(f.type, enum.Enum):
            values[f.name] = next(iter(f.type)).value  # a contract enum: its first member
        elif f.required:
            values[f.name] = (
                "node1"
                if f.name == "node_id"
                else ([] if "list" in str(f.type) else 0 if f.type in (int, "int") else "x")
            )
    return msgspec.convert(values, kind, strict=False)


@pytest.mark.parametrize("kind", [k for k in typing.get_args(ev.AnyEvent) if k is not ev.NodeHeartbeatV1])
def test_export_subjects_are_the_bus_subjects(kind):
    event = _one_of(kind)
    tag = kind.__struct_config__.tag
    assert SUBJECTS[tag].format(node="node1", state=getattr(event, "state", "")) == subject_for(event)


def test_old_events_without_peer_fields_project_as_empty(tmp_path):
    raw = msgspec.json.decode(ev.encode(received(1)))
    del raw["peer_address"], raw["peer_port"]
    store = CatalogStore(tmp_path / "c.duckdb")
    store.apply_raw([1], [msgspec.json.encode(raw)])
    assert store.rows("SELECT peer_address, peer_port FROM instances") == [{"peer_address": "", "peer_port": 0}]
    store.close()


def test_a_file_from_before_peer_columns_gets_them(tmp_path):
    db = tmp_path / "old.duckdb"
    store = CatalogStore(db)
    store.apply([(1, received(1))])
    store.con.execute("ALTER TABLE instances DROP COLUMN peer_address")
    store.con.execute("ALTER TABLE instances DROP COLUMN peer_port")
    store.close()
    store = CatalogStore(db)
    assert store.rows("SELECT sop_instance_uid, peer_address, peer_port FROM instances") == [
        {"sop_instance_uid": "1.2.9.1", "peer_address": "", "peer_port": 0}
    ]
    store.apply([(2, msgspec.structs.replace(received(2), peer_address="192.0.2.9", peer_port=104))])
    assert store.rows("SELECT peer_address, peer_port FROM instances WHERE sop_instance_uid = '1.2.9.2'") == [
        {"peer_address": "192.0.2.9", "peer_port": 104}
    ]
    store.close()
