"""The catalog's DuckDB projection of the event log.

Rows and the last applied stream sequence are written in one transaction, so
after a crash the projection resumes exactly where its data ends, and a
rebuild from sequence 1 yields the same content. Applying an event is
idempotent on its stream sequence.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from collections.abc import Iterable
from pathlib import Path

import duckdb
import msgspec

from shared import events as ev

NAME = "catalog"

# Timestamps are stored as UTC in plain TIMESTAMP columns (TIMESTAMPTZ would need
# pytz to be read back from Python).

SCHEMA = """
CREATE TABLE IF NOT EXISTS projection_state (name VARCHAR PRIMARY KEY, last_seq BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid VARCHAR PRIMARY KEY,
    sop_class_uid VARCHAR, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
    transfer_syntax_uid VARCHAR, modality VARCHAR,
    patient_id VARCHAR, patient_name VARCHAR, patient_birth_date VARCHAR, accession_number VARCHAR,
    study_date VARCHAR, study_description VARCHAR, series_number VARCHAR, instance_number VARCHAR,
    size BIGINT, dataset_digest VARCHAR, blob_key VARCHAR, calling_ae VARCHAR, called_ae VARCHAR,
    received_at TIMESTAMP, received_seq BIGINT, extra_tags JSON
);
CREATE TABLE IF NOT EXISTS locations (
    sop_instance_uid VARCHAR PRIMARY KEY,
    study_instance_uid VARCHAR, node_id VARCHAR, state VARCHAR, placement_id VARCHAR,
    reason VARCHAR, detail VARCHAR, updated_seq BIGINT, updated_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT PRIMARY KEY, event_id VARCHAR, type VARCHAR, sop_instance_uid VARCHAR,
    study_instance_uid VARCHAR, node_id VARCHAR, occurred_at TIMESTAMP, payload JSON
);
"""

_RECEIVED_COLUMNS = (
    "sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid",
    "transfer_syntax_uid", "modality", "patient_id", "patient_name", "patient_birth_date",
    "accession_number", "study_date", "study_description", "series_number", "instance_number",
    "size", "dataset_digest", "blob_key", "calling_ae", "called_ae",
)

_encoder = msgspec.json.Encoder()


class CatalogStore:
    """One DuckDB file; writes are serialised, reads use their own cursors."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(path))
        self.con.execute(SCHEMA)
        self.lock = threading.Lock()

    def close(self) -> None:
        self.con.close()

    def last_seq(self) -> int:
        with self.lock:
            row = self.con.execute("SELECT last_seq FROM projection_state WHERE name = ?", [NAME]).fetchone()
        return row[0] if row else 0

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self.con.cursor()

    def apply(self, batch: Iterable[tuple[int, ev.AnyEvent]]) -> int:
        """Apply events in order, in one transaction with the new last_seq."""
        batch = list(batch)
        if not batch:
            return 0
        with self.lock:
            con = self.con
            con.execute("BEGIN")
            try:
                last = con.execute("SELECT last_seq FROM projection_state WHERE name = ?", [NAME]).fetchone()
                last = last[0] if last else 0
                applied = 0
                for seq, event in batch:
                    if seq <= last:
                        continue
                    _apply_one(con, seq, event)
                    last = seq
                    applied += 1
                con.execute("INSERT OR REPLACE INTO projection_state VALUES (?, ?)", [NAME, last])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return applied


def _utc(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(tzinfo=None)


def _set_location(con, seq: int, event, state: str, detail: str = "", only_if_placement: bool = True) -> None:
    """Move an instance's location state, but only for its current placement."""
    guard = " AND placement_id = ?" if only_if_placement else ""
    params = [state, detail, seq, _utc(event.occurred_at), event.sop_instance_uid]
    if only_if_placement:
        params.append(event.placement_id)
    con.execute(
        "UPDATE locations SET state = ?, detail = ?, updated_seq = ?, updated_at = ? "
        f"WHERE sop_instance_uid = ?{guard}", params,
    )


def _apply_one(con, seq: int, event: ev.AnyEvent) -> None:
    node = getattr(event, "node_id", None)
    con.execute(
        "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [seq, event.event_id, type(event).__struct_config__.tag, getattr(event, "sop_instance_uid", None),
         getattr(event, "study_instance_uid", None), node, _utc(event.occurred_at),
         _encoder.encode(event).decode()],
    )
    match event:
        case ev.InstanceReceivedV1():
            values = [getattr(event, c) for c in _RECEIVED_COLUMNS]
            con.execute(
                f"INSERT OR REPLACE INTO instances ({', '.join(_RECEIVED_COLUMNS)}, received_at, received_seq,"
                f" extra_tags) VALUES ({', '.join('?' * len(_RECEIVED_COLUMNS))}, ?, ?, ?)",
                [*values, _utc(event.occurred_at), seq, _encoder.encode(event.extra_tags).decode()],
            )
        case ev.InstancePlacedV1():
            con.execute(
                "INSERT OR REPLACE INTO locations VALUES (?, ?, ?, 'placed', ?, ?, '', ?, ?)",
                [event.sop_instance_uid, event.study_instance_uid, event.node_id, event.event_id,
                 event.reason, seq, _utc(event.occurred_at)],
            )
        case ev.InstanceForwardedV1():
            _set_location(con, seq, event, "forwarded")
        case ev.InstanceForwardFailedV1():
            _set_location(con, seq, event, "failed", event.reason)
        case ev.InstanceDeadLetteredV1():
            _set_location(con, seq, event, "dead_lettered", event.reason)
        case ev.InstanceVerifiedV1():
            con.execute(
                "UPDATE locations SET state = 'verified', updated_seq = ?, updated_at = ? "
                "WHERE sop_instance_uid = ? AND node_id = ?",
                [seq, _utc(event.occurred_at), event.sop_instance_uid, event.node_id],
            )
        case _:
            pass
