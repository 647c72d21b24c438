"""Audit export: the events (and instances) of a time window as Parquet and CSV.

Reads the catalog's DuckDB file directly, read-only, so it runs while the
catalog service is stopped (DuckDB's file lock refuses a second process while
the service holds the file); stop the service, export, start it again. The
window is half-open, ``since <= occurred_at < until``, in UTC.

Provenance is in columns, not only inside the payload JSON: ``calling_ae``,
``called_ae``, ``peer_address``, ``peer_port`` (of the ``received`` event) and
``subject``, the NATS subject the event's type is published on. Which identity
may publish on which subject is fixed by the NATS permissions
(docs/security.md), so the subject names the publishing service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb


class ExportError(RuntimeError):
    pass


@dataclass
class ExportResult:
    events: int
    instances: int
    files: list[Path]


def parse_when(value: str) -> datetime:
    """An ISO 8601 date or date-time; without a zone it is UTC. Returns naive UTC."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ExportError(f"{value!r} is not an ISO 8601 date or date-time") from exc
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# Event type -> its subject (shared.bus.subject_for; "{node}" is the event's node id, "{state}" a
# node-state event's state).
SUBJECTS = {
    "instance.received.v1": "dicom.instance.received",
    "instance.placed.v1": "dicom.instance.placed.{node}",
    "instance.forwarded.v1": "dicom.instance.forwarded.{node}",
    "instance.forward_failed.v1": "dicom.instance.forward_failed.{node}",
    "instance.dead_lettered.v1": "dicom.instance.dead_lettered",
    "instance.verified.v1": "dicom.instance.verified.{node}",
    "instance.verification_failed.v1": "dicom.instance.verification_failed.{node}",
    "node.state_changed.v1": "node.state.{node}.{state}",
    "instance.resent.v1": "dicom.instance.resent",
    "instance.retry_requested.v1": "dicom.instance.operator.retry_requested",
    "instance.dead_letter_cancelled.v1": "dicom.instance.operator.dead_letter_cancelled",
    "routing.rules_changed.v1": "dicom.instance.operator.rules_changed",
}


def _subject_case() -> str:
    whens = []
    for kind, subject in SUBJECTS.items():
        prefix, node, rest = subject.partition("{node}")
        value = f"{_sql_str(prefix)} || node_id" if node else _sql_str(prefix)
        if rest == ".{state}":
            value += " || '.' || json_extract_string(payload, '$.state')"
        whens.append(f"WHEN {_sql_str(kind)} THEN {value}")
    return f"CASE type {' '.join(whens)} END"


SUBJECT_SQL = _subject_case()


def export(
    db_path: str | Path,
    since: datetime,
    until: datetime,
    out_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write the window's events and instances; ``progress(files written, files to write)`` after each."""
    if until <= since:
        raise ExportError("--until must be after --since")
    db_path, out_dir = Path(db_path), Path(out_dir)
    if not db_path.exists():
        raise ExportError(f"no catalog database at {db_path}")
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.IOException as exc:
        raise ExportError(f"{db_path} is in use by the running catalog service; stop it to export") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    queries = {
        "events": "SELECT seq, event_id, type, sop_instance_uid, study_instance_uid, node_id, occurred_at,"
        f" {SUBJECT_SQL} AS subject,"
        " json_extract_string(payload, '$.calling_ae') AS calling_ae,"
        " json_extract_string(payload, '$.called_ae') AS called_ae,"
        " json_extract_string(payload, '$.peer_address') AS peer_address,"
        " CAST(json_extract(payload, '$.peer_port') AS INTEGER) AS peer_port,"
        " CAST(payload AS VARCHAR) AS payload FROM events"
        " WHERE occurred_at >= $since AND occurred_at < $until ORDER BY seq",
        "instances": "SELECT i.* REPLACE (CAST(i.extra_tags AS VARCHAR) AS extra_tags),"
        f" {_sql_str(SUBJECTS['instance.received.v1'])} AS subject, l.node_id, l.state,"
        " l.reason AS placement_reason, l.detail AS location_detail"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        " WHERE i.received_at >= $since AND i.received_at < $until ORDER BY i.received_seq",
    }
    files, counts = [], {}
    try:
        for name, sql in queries.items():
            params = {"since": since, "until": until}
            row = con.execute(f"SELECT count(*) FROM ({sql})", params).fetchone()
            counts[name] = row[0] if row else 0
            con.execute(f"CREATE TEMP TABLE export_{name} AS {sql}", params)
            for fmt, opts in (("parquet", "FORMAT PARQUET"), ("csv", "FORMAT CSV, HEADER")):
                target = out_dir / f"{name}.{fmt}"
                con.execute(f"COPY export_{name} TO {_sql_str(str(target))} ({opts})")
                files.append(target)
                if progress is not None:
                    progress(len(files), 2 * len(queries))
    finally:
        con.close()
    return ExportResult(counts["events"], counts["instances"], files)
