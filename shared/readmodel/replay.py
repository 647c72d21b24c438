"""Replay the log into a projection store; rebuild one from sequence 1 into a fresh file and swap it in.

Generic over the store (shared.readmodel.store.ProjectionStore: the catalog's
and the probe's DuckDB stores; ``switchyard catalog rebuild`` and
``switchyard probe rebuild``). The log is read off a raw socket
(shared.natswire) when the URL allows it, else through nats-py.

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
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import duckdb

from shared import natsauth, natswire
from shared.bus import Bus
from shared.config import NatsConfig
from shared.readmodel.store import BULK_FOLD_BYTES, BulkLoading, BulkRejected, ProjectionStore

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.api import ConsumerConfig

log = logging.getLogger("switchyard.readmodel.replay")

S = TypeVar("S", bound=ProjectionStore)
Batch = tuple[list[int], list[bytes]]  # (stream sequences, payloads as stored)


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


class LogTruncated(RuntimeError):
    """The log no longer holds what a reader needs: purged, truncated, or replaced under it.

    Waiting would never end (a rebuild waited for events that were gone), and
    going on would silently skip them: the reader stops with what to do.
    """


def log_start(first_seq: int, last_seq: int, messages: int) -> int:
    """The first sequence the stream still holds (last_seq + 1 when it is empty)."""
    return first_seq if messages else last_seq + 1


def check_log_holds(
    what: str, position: int, first_seq: int, last_seq: int, messages: int, accepted_start: int = 0
) -> None:
    """Raise LogTruncated unless the stream still holds every event after ``position``.

    ``position``: the last sequence ``what`` has applied (0: it reads from the start).
    ``accepted_start`` (``nats.accepted_log_start``): the operator accepted a log that
    starts there. A position past the stream's end means the stream was replaced.
    """
    if position > last_seq:
        raise LogTruncated(
            f"{what} holds the log up to sequence {position} but the stream ends at {last_seq}: "
            f"the stream was deleted or replaced. Restore it from a backup, or rebuild the store "
            f"from the log as it is now (switchyard catalog rebuild / probe rebuild)"
        )
    start = log_start(first_seq, last_seq, messages)
    if start > position + 1 and start > accepted_start:
        raise LogTruncated(
            f"{what} needs stream sequence {position + 1} but the log now starts at {start}: events "
            f"{position + 1}..{start - 1} were purged or truncated. Restore the stream from a backup, or "
            f"accept the loss: set nats.accepted_log_start = {start} (SWITCHYARD_NATS__ACCEPTED_LOG_START), "
            f"or rebuild with --accept-log-loss"
        )


async def ensure_log_holds(bus: Bus, what: str, position: int, stream: str | None = None) -> None:
    """check_log_holds against the stream as the server reports it now."""
    info = await bus.js.stream_info(stream or bus.cfg.events_stream)
    st = info.state
    check_log_holds(what, position, st.first_seq, st.last_seq, st.messages, bus.cfg.accepted_log_start)


class ReplayGap(RuntimeError):
    """The reader missed deliveries (it fell too far behind); nothing partial is kept."""


def _consumer_config(inbox: str, start_seq: int) -> ConsumerConfig:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        deliver_subject=inbox,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE,
        flow_control=True,
        idle_heartbeat=5.0,
        inactive_threshold=60.0,
    )


class _Batches:
    """Deliveries collected into (seqs, payloads) batches, checking that none was skipped."""

    def __init__(self, target: int, size: int) -> None:
        self.target, self.size = target, size
        self.seqs: list[int] = []
        self.payloads: list[bytes] = []
        self.dseq = 0
        self.done = False

    def add(self, reply: str, data: bytes) -> bool:
        """Take one delivery; True when a batch is full or the end is reached."""
        return self.add_tokens(*natswire.ack_tokens(reply), data)

    def add_tokens(self, sseq: int, dseq: int, left: int, data: bytes) -> bool:
        if dseq != self.dseq + 1:
            raise ReplayGap(f"delivery {self.dseq + 1} missing (got {dseq})")
        self.dseq = dseq
        if sseq <= self.target:
            self.seqs.append(sseq)
            self.payloads.append(data)
        if sseq >= self.target or left == 0:  # left: deliveries still pending (0 also past a deleted tail)
            self.done = True
        return self.done or len(self.seqs) >= self.size

    def take(self) -> tuple[list[int], list[bytes]]:
        out = (self.seqs, self.payloads)
        self.seqs, self.payloads = [], []
        return out


async def _read_with_client(
    bus: Bus, stream: str, start_seq: int, target: int, batch: int
) -> AsyncGenerator[Batch, None]:
    """nats-py's subscription path (any URL: TLS, credentials); ~90k events/s."""
    nc = bus.nc
    inbox = nc.new_inbox()
    ready: asyncio.Queue[Batch | Exception] = asyncio.Queue(maxsize=4)
    batches = _Batches(target, batch)

    async def on_msg(msg: Msg) -> None:
        if batches.done:
            return
        reply = msg.reply
        if not reply:
            return  # idle heartbeat
        if not reply.startswith(natswire.ACK_PREFIX):
            while ready.qsize() >= 3:  # flow control: answer once the store has caught up
                await asyncio.sleep(0.005)
            await nc.publish(reply, b"")
            return
        try:
            full = batches.add(reply, msg.data)
        except ReplayGap as exc:
            batches.done = True
            await ready.put(exc)
            return
        if full:
            await ready.put(batches.take())
            if batches.done:
                await ready.put(StopAsyncIteration())

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=max(16 * batch, 200_000), pending_bytes_limit=1 << 30)
    try:
        info = await bus.js.add_consumer(stream, _consumer_config(inbox, start_seq))
        try:
            while True:
                item = await ready.get()
                if isinstance(item, StopAsyncIteration):
                    return
                if isinstance(item, Exception):
                    raise item
                if item[0]:
                    yield item
        finally:
            await _delete_consumer(bus, stream, info.name)
    finally:
        await sub.unsubscribe()


async def _delete_consumer(bus: Bus, stream: str, name: str) -> None:
    if bus.authenticated and not natsauth.may_delete_consumers(bus.identity):
        return  # services may not delete consumers; it expires after inactive_threshold
    try:
        await bus.js.delete_consumer(stream, name)
    except Exception:  # noqa: BLE001 - an ephemeral consumer also expires on its own
        pass


async def _read_from_wire(
    bus: Bus, stream: str, start_seq: int, target: int, batch: int, wire: natswire.Wire
) -> AsyncGenerator[Batch, None]:
    """The push consumer's deliveries parsed straight off a socket (shared.natswire): ~2.5x nats-py's path.

    The consumer itself is made through the regular client. The server pauses
    at its flow-control window while the caller applies a batch.
    """
    inbox = bus.nc.new_inbox()  # under this identity's inbox prefix: the only subjects it may subscribe to
    await wire.subscribe(inbox)
    batches = _Batches(target, batch)
    add = batches.add_tokens
    info = await bus.js.add_consumer(stream, _consumer_config(inbox, start_seq))
    try:
        async with aclosing(natswire.deliveries(wire)) as chunks:
            async for got in chunks:
                for sseq, dseq, left, data in got:
                    if add(sseq, dseq, left, data):
                        if batches.seqs:
                            yield batches.take()
                        if batches.done:
                            return
    finally:
        await _delete_consumer(bus, stream, info.name)


async def read_raw_batches(
    bus: Bus, stream: str, start_seq: int, target: int, batch: int
) -> AsyncGenerator[Batch, None]:
    """Yield (seqs, payloads) from ``start_seq`` through ``target``, as stored in the log.

    A push consumer without acks, with flow control; a skipped consumer
    sequence (a dropped delivery) raises ReplayGap. Read off its own socket
    when the URL is plain nats://, else through nats-py.
    """
    try:
        seed_file = natsauth.seed_path(bus.cfg, bus.identity)
        wire = await natswire.connect(bus.cfg.url, seed_file.read_bytes().strip() if seed_file else None)
    except natswire.WireUnsupported as exc:
        _slow_path_once(str(exc))
        async for item in _read_with_client(bus, stream, start_seq, target, batch):
            yield item
        return
    try:
        async for item in _read_from_wire(bus, stream, start_seq, target, batch, wire):
            yield item
    finally:
        wire.close()


_SLOW_PATH_REASONS: set[str] = set()


def _slow_path_once(reason: str) -> None:
    """Say once per reason why replays take nats-py's path (about 2.6x slower): the live follower asks often."""
    if reason not in _SLOW_PATH_REASONS:
        _SLOW_PATH_REASONS.add(reason)
        log.warning("replaying through nats-py, not the raw reader (~2.6x slower): %s", reason)


async def replay_into(
    store: ProjectionStore,
    bus: Bus,
    stream: str | None = None,
    until_seq: int | None = None,
    batch: int = 100_000,
    stop: asyncio.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Apply the stream from the store's last sequence + 1 up to ``until_seq`` (default: the end now).

    Stops early, between batches, once ``stop`` is set. ``progress(seq, target)`` is called per batch read.
    Raises LogTruncated if the log no longer holds the events after the
    store's position (purged or replaced), unless ``nats.accepted_log_start`` accepts it.
    """
    stream = stream or bus.cfg.events_stream
    info = await bus.js.stream_info(stream)
    st = info.state
    target = st.last_seq if until_seq is None else min(until_seq, st.last_seq)
    start = await asyncio.to_thread(store.last_seq)
    check_log_holds(type(store).__name__, start, st.first_seq, st.last_seq, st.messages, bus.cfg.accepted_log_start)
    if target <= start or log_start(st.first_seq, st.last_seq, st.messages) > target:
        return 0  # nothing (left) to read: a consumer would wait for deliveries that never come
    applied = 0
    pending: asyncio.Future[int] | None = None
    try:
        async with aclosing(read_raw_batches(bus, stream, start + 1, target, batch)) as batches:
            async for seqs, payloads in batches:
                if pending is not None:  # apply runs in a thread while the next batch is read
                    applied += await pending
                    pending = None
                pending = asyncio.ensure_future(asyncio.to_thread(store.apply_raw, seqs, payloads))
                if progress is not None and seqs:
                    progress(seqs[-1], target)
                if stop is not None and stop.is_set():
                    break
    finally:
        if pending is not None:  # never leave an apply running on a store about to be closed
            applied += await pending
    return applied


def _unlink_store(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + ".wal")):
        leftover.unlink(missing_ok=True)


async def _replay_fresh(
    bus: Bus,
    fresh: Path,
    store_factory: Callable[[Path], S],
    stream: str | None,
    until_seq: int | None,
    batch: int,
    seed: Callable[[S], None] | None,
    one_transaction: bool,
    fold_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Replay into a new store at ``fresh`` and close it (checkpointed: complete without a WAL)."""
    _unlink_store(fresh)
    store = store_factory(fresh)
    try:
        if seed is not None:
            seed(store)
        bulk = store if isinstance(store, BulkLoading) else None
        if bulk is not None:
            bulk.bulk_load(one_transaction, fold_bytes)
        events = await replay_into(store, bus, stream, until_seq, batch, progress=progress)
        if bulk is not None:
            await asyncio.to_thread(bulk.end_bulk_load)
        return events, store.last_seq()
    finally:
        store.close()


async def rebuild_file(
    nats: NatsConfig,
    path: str | Path,
    store_factory: Callable[[Path], S],
    stream: str | None = None,
    until_seq: int | None = None,
    swap: bool = True,
    batch: int = 100_000,
    seed: Callable[[S], None] | None = None,
    fold_bytes: int = BULK_FOLD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildResult:
    """Replay the log from sequence 1 into ``path``.rebuild, then atomically replace ``path``.

    With ``swap=False`` the fresh file is left at ``path`` itself, which must
    not exist (used to build a copy next to a live store). ``seed``, if given,
    is called with the fresh store before the replay: for state a store keeps
    that does not come from the log (the probe's node cursors). ``fold_bytes``
    bounds the raw events a bulk-loading store holds in memory before folding
    them (``catalog.rebuild_memory_mib``). ``progress(seq, target)``: see ``replay_into``.
    """
    path = Path(path)
    if swap:
        ensure_unlocked(path)
        fresh = path.with_name(path.name + ".rebuild")
    else:
        if path.exists():
            raise FileExistsError(path)
        fresh = path
    _unlink_store(fresh)
    started = time.monotonic()
    once = asyncio.Event()
    once.set()  # a command, not a service: fail at once if NATS is not there
    bus = await asyncio.wait_for(Bus.connect(nats, "switchyard-rebuild", once), 2 + 2 * nats.connect_timeout_s)
    try:
        try:
            events, last = await _replay_fresh(
                bus, fresh, store_factory, stream, until_seq, batch, seed, True, fold_bytes, progress
            )
        except BulkRejected as exc:  # a malformed message: replay again batch by batch, which skips it
            log.warning("one-transaction rebuild rolled back (%s); replaying batch by batch", exc)
            events, last = await _replay_fresh(
                bus, fresh, store_factory, stream, until_seq, batch, seed, False, fold_bytes, progress
            )
    except BaseException:
        if swap:  # the live file was never touched; drop the half-built one
            _unlink_store(fresh)
        raise
    finally:
        await bus.close()
    if swap:
        ensure_unlocked(path)
        path.with_name(path.name + ".wal").unlink(missing_ok=True)
        os.replace(fresh, path)
    seconds = time.monotonic() - started
    log.info("rebuilt %s: %d events up to sequence %d in %.1fs", path, events, last, seconds)
    return RebuildResult(path, events, last, seconds)
