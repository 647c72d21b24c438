"""The catalog's DuckDB projection of the event log (the catalog's store and the probe's Q/R front door's).

Rows and the last applied stream sequence are written in one transaction, so
after a crash the projection resumes exactly where its data ends, and a
rebuild from sequence 1 yields the same content. Applying an event is
idempotent on its stream sequence (only sequences above the stored one are
applied, so ``events`` needs no key on ``seq``).

A batch is handed to DuckDB as raw JSON in one Arrow table and projected in
SQL: every event is stored as sent (``events.payload``, JSON text checked by
the parse), headers go to ``instances``, and each touched location is folded
through the batch's events in order, as applying them one by one would.
"""

from __future__ import annotations

import logging
import threading
import typing
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import msgspec
import pyarrow as pa

from shared import events as ev
from shared.readmodel.store import (
    BULK_FOLD_BYTES,
    STATE_SCHEMA,
    BulkRejected,
    read_last_seq,
    transaction,
    write_last_seq,
)

NAME = "catalog"
log = logging.getLogger("switchyard.readmodel.catalog")
T = TypeVar("T")

# Timestamps are stored as UTC in plain TIMESTAMP columns (TIMESTAMPTZ would need
# pytz to be read back from Python).

SCHEMA = (
    STATE_SCHEMA
    + """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid VARCHAR PRIMARY KEY,
    sop_class_uid VARCHAR, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
    transfer_syntax_uid VARCHAR, modality VARCHAR,
    patient_id VARCHAR, patient_name VARCHAR, patient_birth_date VARCHAR, accession_number VARCHAR,
    study_date VARCHAR, study_description VARCHAR, series_number VARCHAR, instance_number VARCHAR,
    size BIGINT, dataset_digest VARCHAR, blob_key VARCHAR, calling_ae VARCHAR, called_ae VARCHAR,
    received_at TIMESTAMP, received_seq BIGINT, extra_tags JSON,
    peer_address VARCHAR DEFAULT '', peer_port INTEGER DEFAULT 0
);
-- Received events of the instance with a new dataset digest (re-sent with other content).
ALTER TABLE instances ADD COLUMN IF NOT EXISTS versions INTEGER DEFAULT 1;
-- One location per instance and routing pool ('' = the default pool): fan-out
-- gives an instance one per pool; a re-placement replaces its pool's row.
CREATE TABLE IF NOT EXISTS locations (
    sop_instance_uid VARCHAR,
    study_instance_uid VARCHAR, node_id VARCHAR, state VARCHAR, placement_id VARCHAR,
    reason VARCHAR, detail VARCHAR, updated_seq BIGINT, updated_at TIMESTAMP, pool VARCHAR DEFAULT '',
    PRIMARY KEY (sop_instance_uid, pool)
);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT NOT NULL, event_id VARCHAR, type VARCHAR, sop_instance_uid VARCHAR,
    study_instance_uid VARCHAR, node_id VARCHAR, occurred_at TIMESTAMP, payload VARCHAR USING COMPRESSION zstd
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id VARCHAR PRIMARY KEY, state VARCHAR, reason VARCHAR, updated_seq BIGINT, updated_at TIMESTAMP
);
-- The patient / study / series levels, derived from instances (nothing to keep in step:
-- a rebuild or a live batch changes them with the instances). min() rather than any_value
-- so a rebuilt file reads exactly like the live one.
CREATE OR REPLACE VIEW patients AS
    SELECT patient_id, min(patient_name) AS patient_name, min(patient_birth_date) AS patient_birth_date,
           count(DISTINCT study_instance_uid) AS studies, count(*) AS instances, sum(size) AS bytes
    FROM instances GROUP BY patient_id;
CREATE OR REPLACE VIEW studies AS
    SELECT study_instance_uid, min(patient_id) AS patient_id, min(accession_number) AS accession_number,
           min(study_date) AS study_date, min(study_description) AS study_description,
           string_agg(DISTINCT modality, ',' ORDER BY modality) AS modalities,
           count(DISTINCT series_instance_uid) AS series, count(*) AS instances, sum(size) AS bytes,
           min(received_at) AS first_received_at, max(received_at) AS last_received_at
    FROM instances GROUP BY study_instance_uid;
CREATE OR REPLACE VIEW series AS
    SELECT series_instance_uid, min(study_instance_uid) AS study_instance_uid, min(modality) AS modality,
           min(series_number) AS series_number, count(*) AS instances, sum(size) AS bytes
    FROM instances GROUP BY series_instance_uid;
"""
)

_RECEIVED_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_instance_uid",
    "series_instance_uid",
    "transfer_syntax_uid",
    "modality",
    "patient_id",
    "patient_name",
    "patient_birth_date",
    "accession_number",
    "study_date",
    "study_description",
    "series_number",
    "instance_number",
    "size",
    "dataset_digest",
    "blob_key",
    "calling_ae",
    "called_ae",
    "peer_address",
    "peer_port",
)
_LOCATION_COLUMNS = (
    "sop_instance_uid",
    "study_instance_uid",
    "node_id",
    "state",
    "placement_id",
    "reason",
    "detail",
    "updated_seq",
    "updated_at",
    "pool",
)


def _tag(kind: type[msgspec.Struct]) -> str:
    tag = kind.__struct_config__.tag
    assert isinstance(tag, str), kind  # every event type is tagged with its name
    return tag


# How an event moves an instance's location (one row per instance and pool): type tag ->
# (new state, what must match the row: "placement" = its placement_id; "node" = its
# placement_id when the event names one, else its node_id (verified events from before
# placement ids); detail: None keeps it, "" clears it, "reason" takes the event's reason).
# A new location state is one line here.
LOCATION_MOVES: dict[str, tuple[ev.LocationState, str, str | None]] = {
    _tag(ev.InstanceForwardedV1): (ev.LocationState.FORWARDED, "placement", ""),
    _tag(ev.InstanceForwardFailedV1): (ev.LocationState.FAILED, "placement", "reason"),
    _tag(ev.InstanceDeadLetteredV1): (ev.LocationState.DEAD_LETTERED, "placement", "reason"),
    _tag(ev.InstanceVerifiedV1): (ev.LocationState.VERIFIED, "node", None),
    _tag(ev.InstanceVerificationFailedV1): (ev.LocationState.VERIFICATION_FAILED, "placement", "reason"),
    # An operator closed the dead letter (the console); a retry is a new placement, which replaces the row.
    _tag(ev.InstanceDeadLetterCancelledV1): (ev.LocationState.CANCELLED, "placement", "reason"),
}
LOCATION_STATES: tuple[ev.LocationState, ...] = tuple(ev.LocationState)
EVENT_TYPES = tuple(_tag(kind) for kind in typing.get_args(ev.AnyEvent))
_RECEIVED, _PLACED, _NODE_STATE = (_tag(k) for k in (ev.InstanceReceivedV1, ev.InstancePlacedV1, ev.NodeStateChangedV1))


def _lit(value: object) -> str:
    return "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"


def _defaults() -> dict[str, str]:
    """Scalar defaults of fields the projection reads: a message may omit them, as msgspec allows."""
    out = {"extra_tags": "'{}'"}
    for kind in (ev.InstanceReceivedV1, ev.NodeStateChangedV1):
        for f in msgspec.structs.fields(kind):
            if isinstance(f.default, str):
                out[f.name] = _lit(f.default)
    return out


# Each statement parses the batch's payloads itself (json_transform, for just the fields it
# needs): a parse is cheaper than a wide staging table. Typed values are taken as text and
# cast strictly, so a malformed value fails the batch, which is then retried without the
# messages the event decoder rejects (as the live follower skips them).
_DEFAULTS = _defaults()


def _column(name: str) -> str:
    if name == "size":
        return "CAST(j.size AS BIGINT) AS size"
    if name == "peer_port":  # (absent from events written before ingest recorded it)
        return "CAST(coalesce(j.peer_port, '0') AS INTEGER) AS peer_port"
    if name == "occurred_at":  # any UTC offset; a naive time is UTC (the connection's zone)
        return "make_timestamp(epoch_us(CAST(j.occurred_at AS TIMESTAMPTZ))) AS occurred_at"
    default = _DEFAULTS.get(name)
    return f"j.{name} AS {name}" if default is None else f"coalesce(j.{name}, {default}) AS {name}"


def _parsed(fields: tuple[str, ...], types: tuple[str, ...]) -> str:
    """The batch's new events of ``types`` (seq > $1) as rows of seq, payload and ``fields``.

    The encoder writes the type tag first, so the type is read from a prefix
    and only the rows of ``types`` are parsed, once each; a payload in another
    key order is parsed to be sure (OR evaluates its right side only for rows
    the left did not select, so the common case never parses in the filter).
    """
    shape = {f: "JSON" if f == "extra_tags" else "VARCHAR" for f in ("type", *fields)}
    tagged = " OR ".join(
        "starts_with(payload, " + _lit('{"type":' + msgspec.json.encode(t).decode()) + ")" for t in types
    )
    return (
        f"(SELECT seq, payload, {', '.join(_column(f) for f in fields)} FROM ("
        f"SELECT seq, payload, json_transform(payload, {_lit(msgspec.json.encode(shape).decode())}) AS j"
        " FROM (SELECT seq, decode(payload) AS payload FROM raw_batch WHERE seq > $1)"
        f') WHERE {tagged} OR (NOT starts_with(payload, \'{{"type":"\') AND j.type IN ({", ".join(map(_lit, types))})))'
    )


_EVENT_FIELDS = ("event_id", "type", "sop_instance_uid", "study_instance_uid", "node_id", "occurred_at")
_EVENTS_SQL = (
    f"INSERT INTO events SELECT seq, {', '.join(_EVENT_FIELDS)}, payload FROM {_parsed(_EVENT_FIELDS, EVENT_TYPES)}"
)
# The latest received event per instance wins; ``versions`` counts the received events
# whose dataset digest differs from the one before (the same SOP Instance UID re-sent
# with other content), across batches, so a rebuild counts as the live fold did.
_INSTANCES_SQL = (
    f"INSERT OR REPLACE INTO instances ({', '.join(_RECEIVED_COLUMNS)}, received_at, received_seq, extra_tags,"
    " versions)"
    f" SELECT {', '.join('d.' + c for c in _RECEIVED_COLUMNS)}, d.occurred_at, d.seq, d.extra_tags,"
    " CAST(coalesce(i.versions, 0) + sum(CASE WHEN coalesce(d.prev, i.dataset_digest) IS DISTINCT FROM"
    " d.dataset_digest THEN 1 ELSE 0 END) OVER (PARTITION BY d.sop_instance_uid) AS INTEGER)"
    " FROM (SELECT *, lag(dataset_digest) OVER (PARTITION BY sop_instance_uid ORDER BY seq) AS prev"
    f" FROM {_parsed((*_RECEIVED_COLUMNS, 'occurred_at', 'extra_tags'), (_RECEIVED,))}) d"
    " LEFT JOIN instances i ON i.sop_instance_uid = d.sop_instance_uid"
    " QUALIFY row_number() OVER (PARTITION BY d.sop_instance_uid ORDER BY d.seq DESC) = 1"
)
_MOVES = " UNION ALL ".join(
    f"SELECT {_lit(tag)} AS type, {_lit(state)} AS state, {'true' if on == 'placement' else 'false'} AS by_placement,"
    f" {'NULL' if detail is None else 'true' if detail == 'reason' else 'false'} AS detail_is_reason"
    for tag, (state, on, detail) in LOCATION_MOVES.items()
)
# The batch's fold of each touched location (instance, pool), as the events would move it
# one by one: start from the batch's last placement of the instance in that pool (or the
# stored row), then the last matching move sets state and time, the last matching move
# that sets a detail sets it.
_LOCATIONS_SQL = f"""
INSERT OR REPLACE INTO locations ({", ".join(_LOCATION_COLUMNS)})
WITH moves AS ({_MOVES}),
staged AS (SELECT * FROM {
    _parsed(
        (
            "type",
            "event_id",
            "sop_instance_uid",
            "study_instance_uid",
            "node_id",
            "placement_id",
            "reason",
            "occurred_at",
            "pool",
        ),
        (_PLACED, *LOCATION_MOVES),
    )
}),
placed AS (
    SELECT sop_instance_uid, study_instance_uid, node_id, event_id AS placement_id, reason, seq, occurred_at,
           coalesce(pool, '') AS pool
    FROM staged WHERE type = {_lit(_PLACED)}
    QUALIFY row_number() OVER (PARTITION BY sop_instance_uid, coalesce(pool, '') ORDER BY seq DESC) = 1
),
moving AS (SELECT s.*, m.state AS new_state, m.by_placement, m.detail_is_reason
           FROM staged s JOIN moves m USING (type)),
base AS (
    SELECT sop_instance_uid, study_instance_uid, node_id, {_lit(ev.LocationState.PLACED)} AS state, placement_id,
           reason, '' AS detail,
           seq AS updated_seq, occurred_at AS updated_at, pool, seq AS from_seq FROM placed
    UNION ALL
    SELECT {", ".join("l." + c for c in _LOCATION_COLUMNS)}, 0 AS from_seq FROM locations l
    WHERE l.sop_instance_uid IN (SELECT sop_instance_uid FROM moving)
      AND NOT EXISTS (SELECT 1 FROM placed p WHERE p.sop_instance_uid = l.sop_instance_uid AND p.pool = l.pool)
),
moved AS (
    SELECT b.sop_instance_uid, b.pool, arg_max(m.new_state, m.seq) AS state, max(m.seq) AS seq,
           arg_max(m.occurred_at, m.seq) AS occurred_at,
           arg_max(CASE WHEN m.detail_is_reason THEN coalesce(m.reason, '') ELSE '' END, m.seq)
               FILTER (WHERE m.detail_is_reason IS NOT NULL) AS detail,
           bool_or(m.detail_is_reason IS NOT NULL) AS sets_detail
    FROM moving m JOIN base b USING (sop_instance_uid)
    WHERE m.seq > b.from_seq
      AND CASE WHEN m.by_placement OR coalesce(m.placement_id, '') <> '' THEN m.placement_id = b.placement_id
               ELSE m.node_id = b.node_id END
    GROUP BY b.sop_instance_uid, b.pool
)
SELECT b.sop_instance_uid, b.study_instance_uid, b.node_id, coalesce(v.state, b.state), b.placement_id, b.reason,
       CASE WHEN v.sets_detail THEN v.detail ELSE b.detail END, coalesce(v.seq, b.updated_seq),
       coalesce(v.occurred_at, b.updated_at), b.pool
FROM base b LEFT JOIN moved v USING (sop_instance_uid, pool)
WHERE b.from_seq > 0 OR v.sop_instance_uid IS NOT NULL
"""
_NODES_SQL = (
    "INSERT OR REPLACE INTO nodes (node_id, state, reason, updated_seq, updated_at)"
    " SELECT node_id, state, reason, seq, occurred_at"
    f" FROM {_parsed(('node_id', 'state', 'reason', 'occurred_at'), (_NODE_STATE,))}"
    " QUALIFY row_number() OVER (PARTITION BY node_id ORDER BY seq DESC) = 1"
)


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Bring older files to the schema: peer columns on instances; locations re-keyed by pool ('')."""
    peer = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'instances' AND column_name LIKE 'peer_%'"
        ).fetchall()
    }
    tables = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'instances'").fetchone()
    if tables is not None and tables[0]:
        # Files from before ingest recorded the peer's address: the columns, empty (a rebuild fills them).
        if "peer_address" not in peer:
            con.execute("ALTER TABLE instances ADD COLUMN peer_address VARCHAR DEFAULT ''")
        if "peer_port" not in peer:
            con.execute("ALTER TABLE instances ADD COLUMN peer_port INTEGER DEFAULT 0")
    cols = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'locations'"
        ).fetchall()
    }
    if not cols or "pool" in cols:
        return
    with transaction(con):
        con.execute("ALTER TABLE locations RENAME TO locations_before_pools")
        con.execute(SCHEMA)
        con.execute("INSERT INTO locations SELECT *, '' FROM locations_before_pools")
        con.execute("DROP TABLE locations_before_pools")


class BatchRejected(Exception):
    """DuckDB refused a batch of raw events (a malformed message in it)."""


# Rows per Arrow record batch: DuckDB scans record batches in parallel, so one
# batch of 100k events would use one core (measured ~1.4x faster on 2 cores).
_RECORD_BATCH = 10_000


def _arrow_batch(seqs: list[int], payloads: list[bytes]) -> pa.Table:
    """(seq, payload) as an Arrow table built from two buffers: DuckDB scans it without a copy per value.

    About 3x cheaper than handing DuckDB Python lists. The payload is bytes;
    decode() in SQL checks UTF-8 (invalid bytes reject the batch).
    """
    offsets = array("q", accumulate(map(len, payloads), initial=0))
    data = pa.Array.from_buffers(
        pa.large_binary(), len(payloads), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(payloads))]
    )
    table = pa.table({"seq": pa.array(seqs, pa.int64()), "payload": data})
    return pa.Table.from_batches(table.to_batches(max_chunksize=_RECORD_BATCH), table.schema)


class CatalogStore:
    """One DuckDB file; writes are serialised, reads use their own cursors (a BulkLoading ProjectionStore)."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.con = duckdb.connect(str(path))
        self.con.execute("SET TimeZone = 'UTC'")  # a naive event time is UTC, as the encoder means it
        _migrate(self.con)
        self.con.execute(SCHEMA)
        self.lock = threading.Lock()
        self._bulk: _Bulk | None = None

    def close(self) -> None:
        self.con.close()

    def bulk_load(self, one_transaction: bool = True, fold_bytes: int = BULK_FOLD_BYTES) -> None:
        """For a fresh file being rebuilt: load the whole replay as one transaction, folded set-based.

        Each ``apply_raw`` then only appends the batch's ``events`` rows (overlapping
        the reader) and keeps the raw batch in memory; once ``fold_bytes`` of raw
        events are held, and at ``end_bulk_load``, instances, locations and nodes
        are derived from all of them with the same SQL as for one batch (plain
        inserts while the tables are empty: no per-batch upserts into a growing
        table). ``end_bulk_load`` stores the last sequence and commits: nothing is
        visible, and nothing of the load survives a failure, before that commit.
        ``one_transaction=False`` keeps batch-by-batch transactions (the fallback
        after ``BulkRejected``). Either way the file is checkpointed once, at
        close. Not for a live store.
        """
        with self.lock:
            self.con.execute("SET checkpoint_threshold = '1TB'")
            if one_transaction:
                self._bulk = _Bulk(fold_bytes)

    def end_bulk_load(self) -> int:
        """Fold what is still held, store the last sequence and commit the load; returns events applied."""
        with self.lock:
            bulk, self._bulk = self._bulk, None
            if bulk is None or not bulk.started:
                return 0
            con = self.con
            self._in_bulk(bulk, lambda: self._fold(bulk))
            self._in_bulk(bulk, lambda: write_last_seq(con, NAME, bulk.last))
            self._in_bulk(bulk, lambda: con.execute("COMMIT"))
            return bulk.applied

    def _fold(self, bulk: _Bulk) -> None:
        """Instances, locations and nodes from the held batches, as one batch (seq > the load's start)."""
        if not bulk.staged:
            return
        con = self.con
        con.register("raw_batch", pa.concat_tables(bulk.staged))
        bulk.staged, bulk.staged_bytes = [], 0  # the registered table holds the buffers until unregistered
        for table, sql in (("instances", _INSTANCES_SQL), ("locations", _LOCATIONS_SQL), ("nodes", _NODES_SQL)):
            if not con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1)").fetchall()[0][0]:
                sql = sql.replace("INSERT OR REPLACE INTO", "INSERT INTO", 1)  # empty: nothing to replace
            con.execute(sql, [bulk.start]).fetchall()
        con.unregister("raw_batch")  # (on a failure, _in_bulk drops it after the rollback)

    def _in_bulk(self, bulk: _Bulk, step: Callable[[], T]) -> T:
        """Run a step of the load's transaction; on any failure roll all of it back (DuckDB aborts it anyway)."""
        try:
            return step()
        except BaseException as exc:
            self._bulk = None
            undo: Callable[[], object]
            for undo in (lambda: self.con.execute("ROLLBACK"), lambda: self.con.unregister("raw_batch")):
                try:  # (a failed COMMIT has already ended the transaction; the batch may not be registered)
                    undo()
                except duckdb.Error:
                    pass
            if isinstance(exc, (duckdb.ConversionException, duckdb.InvalidInputException)):
                raise BulkRejected(str(exc)) from exc
            raise

    def last_seq(self) -> int:
        with self.lock:
            return read_last_seq(self.con, NAME)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        return self.con.cursor()

    def rows(self, sql: str, params: Sequence[object] | None = None) -> list[dict[str, Any]]:
        """A read query on its own cursor (safe beside the writer), rows as dicts."""
        cur = self.cursor()
        try:
            rel = cur.execute(sql, params or [])
            names = [d[0] for d in rel.description]
            return [dict(zip(names, row, strict=True)) for row in rel.fetchall()]
        finally:
            cur.close()

    def apply(self, batch: Iterable[tuple[int, ev.Event]]) -> int:
        """Apply decoded events (tests, tools): encoded, then as ``apply_raw``, without skipping any."""
        batch = list(batch)
        if self._bulk is not None:
            return self._stage([seq for seq, _ in batch], [ev.encode(e) for _, e in batch])
        return self._apply([seq for seq, _ in batch], [ev.encode(e) for _, e in batch])

    def apply_raw(self, seqs: list[int], payloads: list[bytes]) -> int:
        """Apply events as they are in the log (ascending sequences), in one transaction with the new last_seq.

        DuckDB parses and folds the batch in SQL (no per-event Python work); the raw
        JSON is stored as the audit payload. If DuckDB rejects the batch, messages
        the event decoder rejects are dropped (logged by sequence, as the live
        follower does) and the rest applied.
        """
        if not seqs:
            return 0
        if self._bulk is not None:
            return self._stage(seqs, payloads)
        try:
            return self._apply(seqs, payloads)
        except BatchRejected:
            good_seqs, good = [], []
            for seq, data in zip(seqs, payloads, strict=True):
                try:
                    ev.decode(data)
                except Exception:  # noqa: BLE001 - as the live follower: one bad message is skipped
                    log.error("undecodable message at stream seq %d; skipped", seq)
                    continue
                good_seqs.append(seq)
                good.append(data)
            return self._apply(good_seqs, good, last_seq=seqs[-1])

    def _apply(self, seqs: list[int], payloads: list[bytes], last_seq: int | None = None) -> int:
        if not seqs and last_seq is None:
            return 0
        batch = _arrow_batch(seqs, payloads)
        with self.lock:
            con = self.con
            con.register("raw_batch", batch)
            try:
                with transaction(con):
                    last = read_last_seq(con, NAME)
                    applied = 0
                    if seqs and seqs[-1] > last:
                        try:
                            applied = con.execute(_EVENTS_SQL, [last]).fetchall()[0][0]
                            for sql in (_INSTANCES_SQL, _LOCATIONS_SQL, _NODES_SQL):
                                con.execute(sql, [last]).fetchall()
                        except (duckdb.ConversionException, duckdb.InvalidInputException) as exc:
                            raise BatchRejected(str(exc)) from exc
                    write_last_seq(con, NAME, max(last, seqs[-1] if seqs else 0, last_seq or 0))
            finally:
                con.unregister("raw_batch")
        return applied

    def _stage(self, seqs: list[int], payloads: list[bytes]) -> int:
        """One batch of a bulk load: its events rows now, the batch held for the fold."""
        with self.lock:
            bulk, con = self._bulk, self.con
            assert bulk is not None  # apply/apply_raw stage only during a bulk load
            if not bulk.started:
                con.execute("BEGIN")  # held across calls: committed by end_bulk_load
                bulk.start = bulk.last = read_last_seq(con, NAME)
                bulk.started = True
            new = bisect_right(seqs, bulk.last)  # held once each: the fold sees every event once
            if new == len(seqs):
                return 0
            seqs, payloads = seqs[new:], payloads[new:]
            batch = _arrow_batch(seqs, payloads)
            con.register("raw_batch", batch)
            applied: int = self._in_bulk(bulk, lambda: con.execute(_EVENTS_SQL, [bulk.last]).fetchall()[0][0])
            con.unregister("raw_batch")
            bulk.staged.append(batch)
            bulk.staged_bytes += batch.nbytes
            bulk.last = seqs[-1]
            bulk.applied += applied
            if bulk.staged_bytes >= bulk.fold_bytes:  # bound the memory: fold now, upsert later folds
                self._in_bulk(bulk, lambda: self._fold(bulk))
        return applied


class _Bulk:
    """A bulk load in progress: its transaction's start and last sequence, the raw batches held."""

    def __init__(self, fold_bytes: int) -> None:
        self.fold_bytes = fold_bytes
        self.started = False
        self.start = self.last = self.applied = self.staged_bytes = 0
        self.staged: list[pa.Table] = []
