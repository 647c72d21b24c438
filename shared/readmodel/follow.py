"""The live follower: keeps projection stores up with the log while a service runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import aclosing

import nats.errors

from shared.bus import Bus
from shared.readmodel.replay import LogTruncated, ReplayGap, ensure_log_holds, replay_into
from shared.readmodel.store import ProjectionStore

log = logging.getLogger("switchyard.readmodel.follow")

RETRY_PAUSE_S = 0.5


async def keep_up(
    store: ProjectionStore,
    bus: Bus,
    follow_batch: int,
    stop: asyncio.Event,
    on_applied: Callable[[int, int], None] | None = None,
    catch_up_batch: int = 100_000,
    linger: float = 1.0,
    beside: ProjectionStore | None = None,
    on_beside: Callable[[int], None] | None = None,
) -> None:
    """Keep ``store`` up with the log until ``stop``: the live projection.

    Catches up in large batches through the replay reader (a rebuild's speed),
    then follows the tail with the ordered consumer; a full follower batch
    means it fell behind, so it goes back to catching up in bulk.
    ``on_applied(events, last_seq)`` is called after each transaction.
    A follower batch closes ``linger`` seconds after its first event: each
    batch is a DuckDB transaction of several statements, whose fixed cost
    dominated at a live rate (0.2 s cost the catalog 2.3 ms of CPU per routed
    image at ~100 img/s).

    ``beside``: a second store (``apply`` of decoded ``(seq, event)`` pairs,
    idempotent on the sequence, and ``last_seq``) fed by the same follower,
    from the lower of the two stores' sequences, so a service with two
    projections receives the log once; ``on_beside(last_seq)`` after each of
    its transactions. It is not fed during the bulk catch-up: the follower
    starts from its own last sequence and brings it up.

    A log purged or replaced under either store raises LogTruncated (logged):
    the service exits non-zero instead of following a log with a hole in it.
    """
    report = on_applied or (lambda n, last: None)
    try:
        await _keep_up(store, bus, follow_batch, stop, report, catch_up_batch, linger, beside, on_beside)
    except LogTruncated as exc:
        log.error("%s", exc)
        raise


async def _keep_up(
    store: ProjectionStore,
    bus: Bus,
    follow_batch: int,
    stop: asyncio.Event,
    report: Callable[[int, int], None],
    catch_up_batch: int,
    linger: float,
    beside: ProjectionStore | None,
    on_beside: Callable[[int], None] | None,
) -> None:
    while not stop.is_set():
        try:
            applied = await replay_into(store, bus, batch=catch_up_batch, stop=stop)
        except (TimeoutError, ReplayGap, ConnectionError, nats.errors.Error) as exc:
            log.warning("bulk catch-up stopped (%s); following instead", type(exc).__name__)
            applied = 0
        start = await asyncio.to_thread(store.last_seq)
        report(applied, start)
        follow_from = start if beside is None else min(start, await asyncio.to_thread(beside.last_seq))
        # After a NATS reconnect the ordered consumer may stall until its idle heartbeats
        # are missed (5-25 s, issue #13): leave at once and follow again from the store.
        leave = asyncio.Event()
        watcher = asyncio.create_task(_leave_on_reconnect(bus, stop, leave))
        try:
            if beside is not None:  # the replay checked ``store``; the follower also feeds ``beside``
                await ensure_log_holds(bus, type(beside).__name__, follow_from)
            await _follow(store, bus, follow_batch, leave, report, linger, beside, on_beside, follow_from, start)
        except (TimeoutError, ConnectionError, nats.errors.Error) as exc:
            # A cluster electing a leader answers no consumer request for seconds: not a
            # reason to stop the service; catch up again from the store after a pause.
            log.warning("following the log stopped (%s); catching up again", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_PAUSE_S)
        finally:
            watcher.cancel()


async def _follow(
    store: ProjectionStore,
    bus: Bus,
    follow_batch: int,
    leave: asyncio.Event,
    report: Callable[[int, int], None],
    linger: float,
    beside: ProjectionStore | None,
    on_beside: Callable[[int], None] | None,
    follow_from: int,
    start: int,
) -> None:
    """Follow the tail until ``leave`` or a full batch (fallen behind: the caller catches up in bulk)."""
    async with aclosing(
        bus.follow_batches(follow_from + 1, follow_batch, 0.2, leave, linger=linger, decode=beside is not None)
    ) as batches:
        async for batch in batches:
            seqs = [d.seq for d in batch]
            n = await asyncio.to_thread(store.apply_raw, seqs, [d.msg.data for d in batch])
            start = max(start, seqs[-1])
            report(n, start)
            if beside is not None:
                await asyncio.to_thread(beside.apply, [(d.seq, d.event) for d in batch if d.event is not None])
                if on_beside is not None:
                    on_beside(seqs[-1])
            if len(batch) >= follow_batch:
                break


async def _leave_on_reconnect(bus: Bus, stop: asyncio.Event, leave: asyncio.Event, poll: float = 0.1) -> None:
    """Set ``leave`` on ``stop`` or once the connection has reconnected (nats-py counts reconnects)."""
    reconnects = bus.nc.stats.get("reconnects", 0)
    while not stop.is_set() and bus.nc.stats.get("reconnects", 0) == reconnects:
        try:
            await asyncio.wait_for(stop.wait(), poll)
        except TimeoutError:
            pass
    if not stop.is_set():
        log.info("nats reconnected; following the log again from the store's last sequence")
    leave.set()
