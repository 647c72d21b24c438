"""The probe's DuckDB store: what was forwarded where, and what each node holds.

Two inputs, each with its own durable cursor written in the same transaction
as the rows derived from it:

- the event log (``projection_state``): placements give the digest recorded at
  ingest, forwarded events make an instance *expected* on its node, and the
  probe's own verified / verification-failed events close an expectation (so a
  restarted probe never re-judges what it already published);
- each node's Orthanc ``/changes`` feed (``node_cursor``): every NewInstance is
  recorded in ``seen`` with its SOP Instance UID, Orthanc id and the dataset
  digest of the file the probe downloaded when it saw it.

Verification joins the two: an expected instance that is seen on its node has
its sighting's digest compared with the one recorded at ingest.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from shared import events as ev
from shared.readmodel.store import STATE_SCHEMA, decode_raw, read_last_seq, transaction, write_last_seq

log = logging.getLogger("switchyard.probe.store")

NAME = "probe.verify"

SCHEMA = (
    STATE_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS placements (
    placement_id VARCHAR PRIMARY KEY, sop_instance_uid VARCHAR, study_instance_uid VARCHAR,
    node_id VARCHAR, dataset_digest VARCHAR
);
CREATE TABLE IF NOT EXISTS expected (
    node_id VARCHAR, sop_instance_uid VARCHAR, study_instance_uid VARCHAR, placement_id VARCHAR,
    dataset_digest VARCHAR, forwarded_at TIMESTAMP, state VARCHAR, detail VARCHAR,
    PRIMARY KEY (node_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS node_cursor (node_id VARCHAR PRIMARY KEY, last_change BIGINT NOT NULL);
-- What the scheduler needs to place an instance again after a failed verification
-- (added later: ALTER for files created before).
ALTER TABLE placements ADD COLUMN IF NOT EXISTS received_seq BIGINT DEFAULT 0;
ALTER TABLE placements ADD COLUMN IF NOT EXISTS attempt INTEGER DEFAULT 0;
ALTER TABLE placements ADD COLUMN IF NOT EXISTS avoid VARCHAR DEFAULT '[]';
ALTER TABLE placements ADD COLUMN IF NOT EXISTS pool VARCHAR DEFAULT '';
ALTER TABLE expected ADD COLUMN IF NOT EXISTS received_seq BIGINT DEFAULT 0;
ALTER TABLE expected ADD COLUMN IF NOT EXISTS attempt INTEGER DEFAULT 0;
ALTER TABLE expected ADD COLUMN IF NOT EXISTS avoid VARCHAR DEFAULT '[]';
ALTER TABLE expected ADD COLUMN IF NOT EXISTS pool VARCHAR DEFAULT '';
CREATE TABLE IF NOT EXISTS seen (
    node_id VARCHAR, sop_instance_uid VARCHAR, orthanc_id VARCHAR, change_seq BIGINT,
    PRIMARY KEY (node_id, sop_instance_uid)
);
-- The dataset digest of the file as downloaded when seen (NULL: rows from before, read back when judged).
ALTER TABLE seen ADD COLUMN IF NOT EXISTS dataset_digest VARCHAR;
-- The blob (a semantic comparison when the node's bytes differ) and the instance's failed
-- verifications on earlier nodes (a second one is final).
ALTER TABLE placements ADD COLUMN IF NOT EXISTS blob_key VARCHAR DEFAULT '';
ALTER TABLE placements ADD COLUMN IF NOT EXISTS verification_failures INTEGER DEFAULT 0;
ALTER TABLE expected ADD COLUMN IF NOT EXISTS blob_key VARCHAR DEFAULT '';
ALTER TABLE expected ADD COLUMN IF NOT EXISTS verification_failures INTEGER DEFAULT 0;
-- When ingest recorded the instance (from the forwarded event), for the received -> verified latency.
ALTER TABLE expected ADD COLUMN IF NOT EXISTS received_at TIMESTAMP;
-- The forwarded event's trace context: the verification span is the forward's child.
ALTER TABLE expected ADD COLUMN IF NOT EXISTS traceparent VARCHAR DEFAULT '';
"""
)


@dataclass(frozen=True)
class Expected:
    node_id: str
    sop_instance_uid: str
    study_instance_uid: str
    placement_id: str
    dataset_digest: str
    forwarded_at: datetime
    orthanc_id: str | None = None
    # From the placement, carried into a verification failure (for re-placement).
    received_seq: int = 0
    attempt: int = 0
    avoid: tuple[str, ...] = ()
    pool: str = ""
    # The digest of the node's file when the probe saw it (None: not known, read it back).
    found_digest: str | None = None
    blob_key: str = ""
    verification_failures: int = 0
    received_at: datetime | None = None
    traceparent: str = ""


_EXPECTED = (
    "e.node_id, e.sop_instance_uid, e.study_instance_uid, e.placement_id, e.dataset_digest,"
    " e.forwarded_at, {orthanc_id}, e.received_seq, e.attempt, e.avoid, e.pool, {found},"
    " e.blob_key, e.verification_failures, e.received_at, e.traceparent"
)


def _expected(row) -> Expected:
    *head, avoid, pool, found, blob_key, failures, received_at, traceparent = row
    # mypy cannot tell that *head (the first nine columns) stops before these keywords
    return Expected(
        *head,
        avoid=tuple(json.loads(avoid or "[]")),
        pool=pool or "",  # type: ignore[misc]
        found_digest=found,
        blob_key=blob_key or "",
        verification_failures=failures or 0,
        received_at=received_at,
        traceparent=traceparent or "",
    )


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(tzinfo=None)


class ProbeStore:
    """One DuckDB file; every write is one transaction under the lock (a ProjectionStore of the log).

    ``generation`` counts committed writes: a reader that found nothing to do
    need not ask again until it moves (the probe's idle polls cost no query).
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(path))
        self.con.execute(SCHEMA)
        self.lock = threading.Lock()
        self.generation = 0

    def close(self) -> None:
        self.con.close()

    def _tx(self, fn, *args):
        with self.lock:
            try:
                with transaction(self.con) as con:
                    return fn(con, *args)
            finally:
                self.generation += 1

    def last_seq(self) -> int:
        with self.lock:
            return read_last_seq(self.con, NAME)

    def node_cursor(self, node_id: str) -> int:
        with self.lock:
            row = self.con.execute("SELECT last_change FROM node_cursor WHERE node_id = ?", [node_id]).fetchone()
        return row[0] if row else 0

    # -- the log ---------------------------------------------------------------

    def apply(self, batch: Iterable[tuple[int, ev.AnyEvent]]) -> int:
        """Apply log events in order with the new last_seq; idempotent on the sequence."""
        batch = list(batch)
        if not batch:
            return 0
        return self._tx(_apply_batch, batch)

    def apply_raw(self, seqs: list[int], payloads: list[bytes]) -> int:
        """Log events as stored: decoded here (the fold is in Python), an undecodable one skipped."""
        return self.apply(decode_raw(seqs, payloads))

    # -- the nodes -------------------------------------------------------------

    def record_changes(self, node_id: str, seen: list[tuple[str, str, int, str | None]], last_change: int) -> None:
        """Instances (sop uid, orthanc id, change seq, dataset digest or None) seen on a node, with its new cursor."""

        def write(con):
            row = con.execute("SELECT last_change FROM node_cursor WHERE node_id = ?", [node_id]).fetchone()
            if row is not None and last_change < row[0]:
                # The node's change log went backwards: a new database. What it showed before is gone.
                con.execute("DELETE FROM seen WHERE node_id = ?", [node_id])
            if seen:
                # One statement (row by row cost ~1 ms each); the last sighting of a SOP wins.
                # DELETE + INSERT: DuckDB's INSERT OR REPLACE costs about twice as much CPU.
                last = {row[0]: row for row in seen}
                sops, ids, changes, digests = (list(c) for c in zip(*last.values(), strict=True))
                con.execute(
                    "DELETE FROM seen WHERE node_id = $1 AND sop_instance_uid IN (SELECT unnest($2::VARCHAR[]))",
                    [node_id, sops],
                )
                con.execute(
                    "INSERT INTO seen (node_id, sop_instance_uid, orthanc_id, change_seq, dataset_digest)"
                    " SELECT $1, unnest($2::VARCHAR[]), unnest($3::VARCHAR[]), unnest($4::BIGINT[]),"
                    " unnest($5::VARCHAR[])",
                    [node_id, sops, ids, changes, digests],
                )
            if row is None:
                con.execute("INSERT INTO node_cursor VALUES (?, ?)", [node_id, last_change])
            else:
                con.execute("UPDATE node_cursor SET last_change = ? WHERE node_id = ?", [last_change, node_id])

        self._tx(write)

    def ready_to_check(self, node_id: str) -> list[Expected]:
        """Pending expectations on this node whose instance the node has shown."""
        with self.lock:
            rows = self.con.execute(
                f"SELECT {_EXPECTED.format(orthanc_id='s.orthanc_id', found='s.dataset_digest')}"
                " FROM expected e JOIN seen s USING (node_id, sop_instance_uid)"
                " WHERE e.node_id = ? AND e.state = 'pending' ORDER BY e.forwarded_at",
                [node_id],
            ).fetchall()
        return [_expected(r) for r in rows]

    def overdue(self, node_id: str, now: datetime, deadline_s: float) -> list[Expected]:
        """Pending expectations not seen on the node within the deadline."""
        with self.lock:
            rows = self.con.execute(
                f"SELECT {_EXPECTED.format(orthanc_id='NULL', found='NULL')}"
                " FROM expected e ANTI JOIN seen s USING (node_id, sop_instance_uid)"
                " WHERE e.node_id = ? AND e.state = 'pending'"
                " AND e.forwarded_at + to_microseconds(CAST(? * 1000000 AS BIGINT)) < ?",
                [node_id, deadline_s, _utc(now)],
            ).fetchall()
        return [_expected(r) for r in rows]

    def next_due(self, node_id: str, deadline_s: float) -> datetime | None:
        """When the earliest pending expectation the node has not shown passes the deadline (UTC)."""
        with self.lock:
            row = self.con.execute(
                "SELECT min(e.forwarded_at) FROM expected e ANTI JOIN seen s USING (node_id, sop_instance_uid)"
                " WHERE e.node_id = ? AND e.state = 'pending'",
                [node_id],
            ).fetchone()
        if row is None or row[0] is None:
            return None
        return row[0].replace(tzinfo=UTC) + timedelta(seconds=deadline_s)

    def settle_many(self, outcomes: list[tuple[str, str, str, str, str]]) -> None:
        """Close many expectations in one transaction: (node, sop, placement, state, detail)."""
        if outcomes:
            self._tx(_settle_many, outcomes)

    def carry_node_state(self, live: str | Path) -> bool:
        """Copy each node's /changes cursor and sightings from another store file (a rebuild's live one).

        They come from the nodes, not the log, so a replay cannot recreate them;
        without them the probe would read every node's /changes from the start
        again (correct, but one REST call per instance). False when the file is
        missing or unreadable: the probe then does exactly that.
        """
        live = Path(live)
        if not live.exists():
            return False
        with self.lock:
            try:
                self.con.execute(f"ATTACH '{_quoted(live)}' AS live (READ_ONLY)")
            except duckdb.Error as exc:
                log.warning("node cursors not carried over from %s (%s): nodes are read from the start", live, exc)
                return False
            try:
                with transaction(self.con) as con:
                    for table in ("node_cursor", "seen"):
                        # By name: a live file from before a column was added lacks it (left NULL).
                        cols = ", ".join(
                            d[0] for d in con.execute(f"SELECT * FROM live.main.{table} LIMIT 0").description
                        )
                        con.execute(f"INSERT OR REPLACE INTO {table} ({cols}) SELECT {cols} FROM live.main.{table}")
            finally:
                self.con.execute("DETACH live")
        return True

    def states(self) -> dict[tuple[str, str], str]:
        with self.lock:
            rows = self.con.execute("SELECT node_id, sop_instance_uid, state FROM expected").fetchall()
        return {(n, s): st for n, s, st in rows}


def _settle_many(con, outcomes: list[tuple[str, str, str, str, str]]) -> None:
    """One UPDATE for a poll's outcomes (the last one per expectation wins)."""
    last = {(o[0], o[1], o[2]): o for o in outcomes}
    cols = [list(c) for c in zip(*last.values(), strict=True)]
    con.execute(
        "UPDATE expected SET state = u.state, detail = u.detail FROM (SELECT unnest($1::VARCHAR[]) AS node_id,"
        " unnest($2::VARCHAR[]) AS sop, unnest($3::VARCHAR[]) AS placement_id, unnest($4::VARCHAR[]) AS state,"
        " unnest($5::VARCHAR[]) AS detail) u WHERE expected.node_id = u.node_id"
        " AND expected.sop_instance_uid = u.sop AND expected.placement_id = u.placement_id",
        cols,
    )


# The tail from received_seq on is the placement's, copied into the expectation.
_EXPECTED_COLUMNS = (
    "node_id",
    "sop_instance_uid",
    "study_instance_uid",
    "placement_id",
    "dataset_digest",
    "forwarded_at",
    "state",
    "detail",
    "received_seq",
    "attempt",
    "avoid",
    "pool",
    "blob_key",
    "verification_failures",
    "received_at",
    "traceparent",
)
_PLACEMENT_COLUMNS = (
    "placement_id",
    "sop_instance_uid",
    "study_instance_uid",
    "node_id",
    "dataset_digest",
    "received_seq",
    "attempt",
    "avoid",
    "pool",
    "blob_key",
    "verification_failures",
)
_PLACEMENT_TYPES = ["VARCHAR"] * 5 + ["BIGINT", "INTEGER", "VARCHAR", "VARCHAR", "VARCHAR", "INTEGER"]
_EXPECTED_TYPES = ["VARCHAR"] * 5 + [
    "TIMESTAMP",
    "VARCHAR",
    "VARCHAR",
    "BIGINT",
    "INTEGER",
    "VARCHAR",
    "VARCHAR",
    "VARCHAR",
    "INTEGER",
    "TIMESTAMP",
    "VARCHAR",
]


def _apply_batch(con, batch: list[tuple[int, ev.AnyEvent]]) -> int:
    """Apply log events in order: folded in Python, then one statement per table.

    Row-by-row statements ran at ~120 events/s (a rebuild of a long log took
    hours); each placement and expectation the batch touches is read at most
    once, moved through its events in order and written once: the same rows as
    applying event by event.
    """
    last = read_last_seq(con, NAME)
    todo = [(seq, e) for seq, e in batch if seq > last]
    if not todo:
        return 0
    # Rows from earlier batches that this one moves: read once.
    placed_here = {e.event_id for _, e in todo if type(e) is ev.InstancePlacedV1}
    wanted_placements = {
        e.placement_id for _, e in todo if type(e) is ev.InstanceForwardedV1 and e.placement_id not in placed_here
    }
    placements: dict[str, tuple | None] = {}  # placement id -> row, None once deleted
    if wanted_placements:
        for r in con.execute(
            f"SELECT {', '.join(_PLACEMENT_COLUMNS)} FROM placements"
            " WHERE placement_id IN (SELECT unnest($1::VARCHAR[]))",
            [list(wanted_placements)],
        ).fetchall():
            placements[r[0]] = r
    judged = {
        (e.node_id, e.sop_instance_uid)
        for _, e in todo
        if isinstance(e, (ev.InstanceVerifiedV1, ev.InstanceVerificationFailedV1))
    }
    expected: dict[tuple[str, str], list] = {}
    if judged:
        nodes, sops = zip(*judged, strict=True)
        for r in con.execute(
            f"SELECT {', '.join(_EXPECTED_COLUMNS)} FROM expected WHERE (node_id, sop_instance_uid) IN"
            " (SELECT (unnest($1::VARCHAR[]), unnest($2::VARCHAR[])))",
            [list(nodes), list(sops)],
        ).fetchall():
            expected[(r[0], r[1])] = list(r)
    dirty: set[tuple[str, str]] = set()
    deleted: set[str] = set()
    for _, event in todo:
        if type(event) is ev.InstancePlacedV1:
            placements[event.event_id] = (
                event.event_id,
                event.sop_instance_uid,
                event.study_instance_uid,
                event.node_id,
                event.dataset_digest,
                event.received_seq,
                event.attempt,
                json.dumps(event.avoid),
                event.pool,
                event.blob_key,
                event.verification_failures,
            )
            deleted.discard(event.event_id)
        elif type(event) is ev.InstanceForwardedV1:
            placed = placements.get(event.placement_id)
            if placed is not None:
                # The expectation carries the digest (and what a re-placement needs) from here on.
                placements[event.placement_id] = None
                deleted.add(event.placement_id)
                key = (event.node_id, event.sop_instance_uid)
                expected[key] = [
                    *key,
                    event.study_instance_uid,
                    event.placement_id,
                    placed[4],
                    _utc(event.occurred_at),
                    "pending",
                    "",
                    *placed[5:],
                    _utc(event.received_at) if event.received_at is not None else None,
                    event.traceparent,
                ]
                dirty.add(key)
        elif type(event) is ev.InstanceDeadLetteredV1:
            placements[event.placement_id] = None
            deleted.add(event.placement_id)
        elif (type(event) is ev.InstanceVerifiedV1 and event.placement_id) or type(
            event
        ) is ev.InstanceVerificationFailedV1:
            key = (event.node_id, event.sop_instance_uid)
            row = expected.get(key)
            if row is not None and row[3] == event.placement_id:
                row[6], row[7] = (
                    ("failed", event.reason) if isinstance(event, ev.InstanceVerificationFailedV1) else ("verified", "")
                )
                dirty.add(key)
    if deleted:
        con.execute("DELETE FROM placements WHERE placement_id IN (SELECT unnest($1::VARCHAR[]))", [list(deleted)])
    kept = [r for pid, r in placements.items() if r is not None and pid in placed_here]
    if kept:
        con.execute(
            f"INSERT OR REPLACE INTO placements ({', '.join(_PLACEMENT_COLUMNS)}) SELECT "
            + ", ".join(f"unnest(${i}::{t}[])" for i, t in enumerate(_PLACEMENT_TYPES, start=1)),
            [list(c) for c in zip(*kept, strict=True)],
        )
    if dirty:
        cols = [list(c) for c in zip(*(expected[k] for k in dirty), strict=True)]
        con.execute(
            f"INSERT OR REPLACE INTO expected ({', '.join(_EXPECTED_COLUMNS)}) SELECT "
            + ", ".join(f"unnest(${i}::{t}[])" for i, t in enumerate(_EXPECTED_TYPES, start=1)),
            cols,
        )
    write_last_seq(con, NAME, todo[-1][0])
    return len(todo)
