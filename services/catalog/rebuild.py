"""Rebuild a projection store from sequence 1 into a fresh file, then swap it in.

Generic over the store: any class with ``Store(path)``, ``apply(batch)``,
``last_seq()`` and ``close()`` (the catalog's and the probe's DuckDB stores:
``switchyard catalog rebuild`` and ``switchyard probe rebuild``).

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

from shared import events as ev
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


class ReplayGap(RuntimeError):
    """The reader missed deliveries (it fell too far behind); nothing partial is kept."""


def _ack_tokens(reply: str) -> tuple[int, int, int]:
    """(stream seq, consumer seq, pending) from a JetStream ack subject (v1 or v2 form)."""
    t = reply.split(".")
    if len(t) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
        return int(t[5]), int(t[6]), int(t[8])
    return int(t[7]), int(t[8]), int(t[10])  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>...


async def read_raw_batches(bus: Bus, stream: str, start_seq: int, target: int, batch: int):
    """Yield lists of (stream seq, raw bytes) from ``start_seq`` through ``target``.

    A plain push consumer (no acks, flow control) read with a callback: about
    5x faster than the ordered consumer's per-message path in nats-py. Flow
    control replies are sent only while fewer than four batches wait, so a
    slow store holds the server back instead of filling memory; a skipped
    consumer sequence (a dropped delivery) raises ReplayGap.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = bus.nc
    inbox = nc.new_inbox()
    ready: asyncio.Queue = asyncio.Queue(maxsize=4)
    state = {"rows": [], "dseq": 0, "done": False}

    async def on_msg(msg) -> None:
        if state["done"]:
            return
        reply = msg.reply
        if not reply:
            return  # idle heartbeat
        if not reply.startswith("$JS.ACK."):
            while ready.qsize() >= 3:  # flow control: answer once the store has caught up
                await asyncio.sleep(0.005)
            await nc.publish(reply, b"")
            return
        sseq, dseq, left = _ack_tokens(reply)
        if dseq != state["dseq"] + 1:
            state["done"] = True
            await ready.put(ReplayGap(f"delivery {state['dseq'] + 1} missing (got {dseq})"))
            return
        state["dseq"] = dseq
        if sseq <= target:
            state["rows"].append((sseq, msg.data))
        end = sseq >= target or left == 0  # left: deliveries still pending (0 also past a deleted tail)
        if end or len(state["rows"]) >= batch:
            rows, state["rows"] = state["rows"], []
            await ready.put(rows)
            if end:
                state["done"] = True
                await ready.put(StopAsyncIteration())

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=max(16 * batch, 200_000),
                             pending_bytes_limit=1 << 30)
    try:
        info = await bus.js.add_consumer(stream, ConsumerConfig(
            deliver_subject=inbox, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq,
            ack_policy=AckPolicy.NONE, flow_control=True, idle_heartbeat=5.0, inactive_threshold=60.0,
        ))
        try:
            while True:
                item = await ready.get()
                if isinstance(item, StopAsyncIteration):
                    return
                if isinstance(item, Exception):
                    raise item
                if item:
                    yield item
        finally:
            try:
                await bus.js.delete_consumer(stream, info.name)
            except Exception:  # noqa: BLE001 - an ephemeral consumer also expires on its own
                pass
    finally:
        await sub.unsubscribe()


def _decode_and_apply(store: Any, raw: list[tuple[int, bytes]]) -> int:
    rows = []
    for seq, data in raw:
        try:
            rows.append((seq, ev.decode(data)))
        except Exception:  # noqa: BLE001 - as the live projection: one bad message is skipped
            log.error("undecodable message at stream seq %d; skipped", seq)
    return store.apply(rows)


async def replay_into(store: Any, bus: Bus, stream: str | None = None, until_seq: int | None = None,
                      batch: int = 20000) -> int:
    """Apply the stream from the store's last sequence + 1 up to ``until_seq`` (default: the end now)."""
    stream = stream or bus.cfg.events_stream
    info = await bus.js.stream_info(stream)
    target = info.state.last_seq if until_seq is None else min(until_seq, info.state.last_seq)
    start = await asyncio.to_thread(store.last_seq)
    if target <= start:
        return 0
    applied = 0
    pending: asyncio.Future | None = None
    try:
        async for raw in read_raw_batches(bus, stream, start + 1, target, batch):
            if pending is not None:  # decode+apply runs in a thread while the next batch is read
                applied += await pending
                pending = None
            pending = asyncio.ensure_future(asyncio.to_thread(_decode_and_apply, store, raw))
    finally:
        if pending is not None:  # never leave an apply running on a store about to be closed
            applied += await pending
    return applied


async def rebuild_file(nats: NatsConfig, path: str | Path, store_factory: Callable[[Path], Any],
                       stream: str | None = None, until_seq: int | None = None,
                       swap: bool = True, batch: int = 20000,
                       seed: Callable[[Any], None] | None = None) -> RebuildResult:
    """Replay the log from sequence 1 into ``path``.rebuild, then atomically replace ``path``.

    With ``swap=False`` the fresh file is left at ``path`` itself, which must
    not exist (used to build a copy next to a live store). ``seed``, if given,
    is called with the fresh store before the replay: for state a store keeps
    that does not come from the log (the probe's node cursors).
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
    ok = False
    try:
        if seed is not None:
            seed(store)
        once = asyncio.Event()
        once.set()  # a command, not a service: fail at once if NATS is not there
        bus = await asyncio.wait_for(Bus.connect(nats, "switchyard-rebuild", once), 2 + 2 * nats.connect_timeout_s)
        try:
            events = await replay_into(store, bus, stream, until_seq, batch)
        finally:
            await bus.close()
        last = store.last_seq()
        ok = True
    finally:
        store.close()  # checkpoints: the file is complete without a WAL
        if not ok and swap:  # the live file was never touched; drop the half-built one
            for leftover in (fresh, fresh.with_name(fresh.name + ".wal")):
                leftover.unlink(missing_ok=True)
    if swap:
        ensure_unlocked(path)
        path.with_name(path.name + ".wal").unlink(missing_ok=True)
        os.replace(fresh, path)
    seconds = time.monotonic() - started
    log.info("rebuilt %s: %d events up to sequence %d in %.1fs", path, events, last, seconds)
    return RebuildResult(path, events, last, seconds)
