"""What a projection store is, for the replay and the live follower; the helpers every store uses.

Every store keeps its resume position (``projection_state``) in the same
DuckDB file and writes it in the same transaction as the rows derived from
the events, so after a crash it resumes exactly where its data ends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import duckdb

from shared import events as ev

log = logging.getLogger("switchyard.readmodel")

STATE_SCHEMA = "CREATE TABLE IF NOT EXISTS projection_state (name VARCHAR PRIMARY KEY, last_seq BIGINT NOT NULL);"

# Raw events a bulk load holds before folding them (memory bound; 1M instances of the
# benchmark's log are 4M events, 2.3 GB: one fold).
BULK_FOLD_BYTES = 4 << 30


class BulkRejected(Exception):
    """A one-transaction rebuild met a malformed message: everything was rolled back.

    DuckDB aborts a transaction on any failed statement, so the bulk load cannot
    skip the message and go on; the caller replays again batch by batch, which does.
    """


class ProjectionStore(Protocol):
    """A store the replay, the rebuild and the live follower can feed (idempotent on the sequence)."""

    def last_seq(self) -> int:
        """The last stream sequence applied (0 for a fresh store)."""

    def apply(self, batch: Iterable[tuple[int, ev.AnyEvent]]) -> int:
        """Apply decoded (seq, event) pairs above last_seq, with the new last_seq, in one transaction."""

    def apply_raw(self, seqs: list[int], payloads: list[bytes]) -> int:
        """The same for events as stored in the log; an undecodable message is skipped."""

    def close(self) -> None: ...


@runtime_checkable
class BulkLoading(ProjectionStore, Protocol):
    """A store that can load a whole replay faster into a fresh file (the rebuild uses it if offered)."""

    def bulk_load(self, one_transaction: bool = True, fold_bytes: int = BULK_FOLD_BYTES) -> None: ...

    def end_bulk_load(self) -> int: ...


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, rolled back on any failure (the caller holds the store's lock)."""
    con.execute("BEGIN")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:  # a failed COMMIT has already ended the transaction
            pass
        raise


def read_last_seq(con: duckdb.DuckDBPyConnection, name: str) -> int:
    """The projection ``name``'s stored resume position (0 if it has none yet)."""
    # fetchall, not fetchone: an unfinished result makes DuckDB refuse the connection's next register().
    rows = con.execute("SELECT last_seq FROM projection_state WHERE name = ?", [name]).fetchall()
    return rows[0][0] if rows else 0


def write_last_seq(con: duckdb.DuckDBPyConnection, name: str, seq: int) -> None:
    """Store the resume position: call inside the transaction that writes the rows."""
    con.execute("INSERT OR REPLACE INTO projection_state VALUES (?, ?)", [name, seq])


def decode_raw(seqs: list[int], payloads: list[bytes]) -> list[tuple[int, ev.AnyEvent]]:
    """Decode raw log messages; one that does not decode is logged by sequence and skipped."""
    rows = []
    for seq, data in zip(seqs, payloads, strict=True):
        try:
            rows.append((seq, ev.decode(data)))
        except Exception:  # noqa: BLE001 - as the live projection: one bad message is skipped
            log.error("undecodable message at stream seq %d; skipped", seq)
    return rows
