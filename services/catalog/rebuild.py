"""Rebuild a projection store from sequence 1 into a fresh file, then swap it in.

Generic over the store: any class with ``Store(path)``, ``apply(batch)``,
``last_seq()`` and ``close()`` (the catalog's and the probe's DuckDB stores).

The swap is safe only while no service holds the live file, so rebuild runs
with the owning service stopped and refuses otherwise: DuckDB takes an
exclusive file lock per process, and opening a locked file fails. The check is
made before replaying and again just before the swap; the swap itself is one
``os.replace`` of a closed, checkpointed file (no WAL), so a reader either sees
the old file or the new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from shared.bus import Bus
from shared.config import NatsConfig

log = logging.getLogger("switchyard.catalog.rebuild")


class StoreInUse(RuntimeError):
    """The live store file is open in another process (its service is running)."""


@dataclass
class RebuildResult:
    path: Path
    events: int
    last_seq: int
    seconds: float


def ensure_unlocked(path: Path) -> None:
    """Raise StoreInUse if another process holds the DuckDB file."""
    if not path.exists():
        return
    try:
        duckdb.connect(str(path)).close()
    except duckdb.IOException as exc:
        raise StoreInUse(f"{path} is in use by a running service; stop it before a rebuild") from exc


async def replay_into(store: Any, bus: Bus, stream: str | None = None, until_seq: int | None = None,
                      batch: int = 20000) -> int:
    """Apply the stream from the store's last sequence + 1 up to ``until_seq`` (default: the end now)."""
    stream = stream or bus.cfg.events_stream
    info = await bus.js.stream_info(stream)
    target = info.state.last_seq if until_seq is None else min(until_seq, info.state.last_seq)
    start = await asyncio.to_thread(store.last_seq)
    if target <= start:
        return 0
    stop = asyncio.Event()
    applied = 0
    pending: asyncio.Future | None = None
    async for delivered in bus.follow_batches(start + 1, batch, 0.5, stop, stream=stream):
        rows = [(d.seq, d.event) for d in delivered if d.seq <= target]
        if pending is not None:  # apply runs in a thread while the next batch is read
            applied += await pending
        pending = asyncio.ensure_future(asyncio.to_thread(store.apply, rows))
        if delivered[-1].seq >= target:
            break
    if pending is not None:
        applied += await pending
    return applied


async def rebuild_file(nats: NatsConfig, path: str | Path, store_factory: Callable[[Path], Any],
                       stream: str | None = None, until_seq: int | None = None,
                       swap: bool = True, batch: int = 20000) -> RebuildResult:
    """Replay the log from sequence 1 into ``path``.rebuild, then atomically replace ``path``.

    With ``swap=False`` the fresh file is left at ``path`` itself, which must
    not exist (used to build a copy next to a live store).
    """
    path = Path(path)
    if swap:
        ensure_unlocked(path)
        fresh = path.with_name(path.name + ".rebuild")
    else:
        if path.exists():
            raise FileExistsError(path)
        fresh = path
    for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
        leftover.unlink(missing_ok=True)
    started = time.monotonic()
    store = store_factory(fresh)
    try:
        bus = await Bus.connect(nats, "rebuild")
        try:
            events = await replay_into(store, bus, stream, until_seq, batch)
        finally:
            await bus.close()
        last = store.last_seq()
    finally:
        store.close()  # checkpoints: the file is complete without a WAL
    if swap:
        ensure_unlocked(path)
        path.with_name(path.name + ".wal").unlink(missing_ok=True)
        os.replace(fresh, path)
    seconds = time.monotonic() - started
    log.info("rebuilt %s: %d events up to sequence %d in %.1fs", path, events, last, seconds)
    return RebuildResult(path, events, last, seconds)
