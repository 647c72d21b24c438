"""Audit export: the window is half-open and both formats hold the same rows."""

from __future__ import annotations

from datetime import datetime, timezone

import duckdb
import pytest

from services.catalog.audit import ExportError, export, parse_when
from shared.readmodel.catalog import CatalogStore
from switchyard import cli
from tests.factories import forwarded, placed, received


def at(hour: int) -> datetime:
    return datetime(2026, 3, 1, hour, tzinfo=timezone.utc)


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
    assert cli.main(["audit", "export", "--db", str(db), "--since", "2026-03-01", "--until", "2026-03-02",
                     "--out", str(out)]) == 0
    assert "9 events, 3 instances" in capsys.readouterr().out
    assert (out / "instances.csv").exists()
    assert cli.main(["audit", "export", "--db", str(db), "--since", "yesterday", "--until", "2026-03-02",
                     "--out", str(out)]) == 1
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
    config.write_text(f'[nats]\nurl = "nats://127.0.0.1:{free_port()}"\nconnect_timeout_s = 0.5\nallow_unauthenticated = true\n')
    assert cli.main(["--config", str(config), "catalog", "rebuild", "--db", str(db)]) == 1
    assert "cannot read the log" in capsys.readouterr().err
    assert not (tmp_path / "c.duckdb.rebuild").exists()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (9,)
