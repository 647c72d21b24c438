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
import json
import logging
import os
import re
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import duckdb
import nats.errors

from shared import events as ev
from shared import natsauth
from services.catalog.projection import BULK_FOLD_BYTES, BulkRejected
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


def _consumer_config(inbox: str, start_seq: int):
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        deliver_subject=inbox, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE, flow_control=True, idle_heartbeat=5.0, inactive_threshold=60.0,
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
        return self.add_tokens(*_ack_tokens(reply), data)

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


async def _read_with_client(bus: Bus, stream: str, start_seq: int, target: int, batch: int):
    """nats-py's subscription path (any URL: TLS, credentials); ~90k events/s."""
    nc = bus.nc
    inbox = nc.new_inbox()
    ready: asyncio.Queue = asyncio.Queue(maxsize=4)
    batches = _Batches(target, batch)

    async def on_msg(msg) -> None:
        if batches.done:
            return
        reply = msg.reply
        if not reply:
            return  # idle heartbeat
        if not reply.startswith("$JS.ACK."):
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

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=max(16 * batch, 200_000),
                             pending_bytes_limit=1 << 30)
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


# A delivery to the replay's subscription (sid 1) with a v1 ack subject
# ($JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>): groups
# sseq, dseq, pending, header bytes (HMSG), total bytes. Anything else takes the general path.
# (Single-character negations: sre counts those in a tight loop, ~2x faster than a class.)
_DELIVERY = re.compile(rb"H?MSG [^ ]+ 1 \$JS\.ACK\.[^.]+\.[^.]+\.\d+\.(\d+)\.(\d+)\.\d+\.(\d+)"
                       rb" (?:(\d+) )?(\d+)\r\n")


class _WireUnsupported(Exception):
    """The server wants TLS or the URL is not plain nats://: use the client path."""


async def _wire_connect(cfg: NatsConfig, identity: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(cfg.url.split(",")[0].strip())
    if parts.scheme not in ("nats", "") or not parts.hostname:
        raise _WireUnsupported(cfg.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 4222, limit=1 << 20)
    try:
        line = await reader.readline()
        if not line.startswith(b"INFO "):
            raise _WireUnsupported("no INFO from the server")
        info = json.loads(line[5:])
        seed = natsauth.seed_path(cfg, identity)
        if info.get("tls_required") or (info.get("nonce") and seed is None):  # TLS, or JWT auth: the client's
            raise _WireUnsupported("server needs TLS or credentials")
        hello = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "protocol": 1,
                 "lang": "python-raw", "version": "1", "name": "switchyard-rebuild-reader"}
        if seed is not None:  # nkey: sign the server's nonce with this identity's seed
            raw_seed = seed.read_bytes().strip()
            hello.update(nkey=natsauth.public_key(raw_seed), sig=natsauth.sign_nonce(raw_seed, info.get("nonce", "")))
        elif parts.username and parts.password is not None:
            hello.update(user=unquote(parts.username), pass_=unquote(parts.password))
            hello["pass"] = hello.pop("pass_")
        elif parts.username:
            hello["auth_token"] = unquote(parts.username)
        writer.write(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if line.startswith(b"PONG"):
                return reader, writer
            if line.startswith(b"-ERR") or not line:
                raise ConnectionError(f"nats refused the reader: {line.decode(errors='replace').strip()}")
    except BaseException:
        writer.close()
        raise


async def _read_from_wire(bus: Bus, stream: str, start_seq: int, target: int, batch: int,
                          wire: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
    """The push consumer's deliveries parsed straight off a socket: ~2.5x nats-py's message path.

    Only the protocol a push consumer delivers is handled (MSG/HMSG, PING,
    flow control); the consumer itself is made through the regular client. The
    server pauses at its flow-control window while the caller applies a batch.
    """
    reader, writer = wire
    inbox = bus.nc.new_inbox()  # under this identity's inbox prefix: the only subjects it may subscribe to
    writer.write(f"SUB {inbox} 1\r\nPING\r\n".encode())
    await writer.drain()
    batches = _Batches(target, batch)
    add = batches.add_tokens
    delivery = _DELIVERY.match
    info = await bus.js.add_consumer(stream, _consumer_config(inbox, start_seq))
    try:
        buf = b""
        while not batches.done:
            chunk = await reader.read(1 << 22)
            if not chunk:
                raise ConnectionError("nats closed the connection during the replay")
            buf = buf + chunk if buf else chunk
            pos, size, out = 0, len(buf), []
            while not batches.done:
                m = delivery(buf, pos)
                if m is not None:  # the common case, parsed in C: a delivery with a v1 ack subject
                    sseq, dseq, left, headers, length = m.groups()
                    start = m.end()
                    end = start + int(length)
                    if end + 2 > size:
                        break
                    pos = end + 2
                    if add(int(sseq), int(dseq), int(left), buf[start + int(headers or 0):end]):
                        if batches.seqs:
                            yield batches.take()
                    continue
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                op = buf[pos:pos + 4]
                if op == b"MSG " or op == b"HMSG":
                    args = buf[pos:eol].split()
                    start = eol + 2
                    end = start + int(args[-1])
                    if end + 2 > size:
                        break
                    pos = end + 2
                    headers = int(args[-2]) if op == b"HMSG" else 0
                    if len(args) < (6 if op == b"HMSG" else 5):
                        continue  # no reply subject: an idle heartbeat
                    reply = args[3].decode()
                    if not reply.startswith("$JS.ACK."):
                        out.append(b"PUB " + args[3] + b" 0\r\n\r\n")  # flow control: we are reading
                        continue
                    if batches.add(reply, buf[start + headers:end]):
                        if batches.seqs:
                            yield batches.take()
                elif op == b"PING":
                    out.append(b"PONG\r\n")
                    pos = eol + 2
                elif op == b"-ERR":
                    raise ConnectionError(f"nats: {buf[pos:eol].decode(errors='replace')}")
                else:  # +OK, PONG, INFO
                    pos = eol + 2
            buf = buf[pos:]
            if out:
                writer.write(b"".join(out))
        if batches.seqs:
            yield batches.take()
    finally:
        await _delete_consumer(bus, stream, info.name)


async def read_raw_batches(bus: Bus, stream: str, start_seq: int, target: int, batch: int):
    """Yield (seqs, payloads) from ``start_seq`` through ``target``, as stored in the log.

    A push consumer without acks, with flow control; a skipped consumer
    sequence (a dropped delivery) raises ReplayGap. Read off its own socket
    when the URL is plain nats://, else through nats-py.
    """
    try:
        wire = await _wire_connect(bus.cfg, bus.identity)
    except _WireUnsupported as exc:
        log.info("replaying through the client (%s)", exc)
        async for item in _read_with_client(bus, stream, start_seq, target, batch):
            yield item
        return
    try:
        async for item in _read_from_wire(bus, stream, start_seq, target, batch, wire):
            yield item
    finally:
        wire[1].close()


def _decode_and_apply(store: Any, seqs: list[int], payloads: list[bytes]) -> int:
    if hasattr(store, "apply_raw"):
        return store.apply_raw(seqs, payloads)
    rows = []
    for seq, data in zip(seqs, payloads):
        try:
            rows.append((seq, ev.decode(data)))
        except Exception:  # noqa: BLE001 - as the live projection: one bad message is skipped
            log.error("undecodable message at stream seq %d; skipped", seq)
    return store.apply(rows)


async def replay_into(store: Any, bus: Bus, stream: str | None = None, until_seq: int | None = None,
                      batch: int = 100_000, stop: asyncio.Event | None = None) -> int:
    """Apply the stream from the store's last sequence + 1 up to ``until_seq`` (default: the end now).

    Stops early, between batches, once ``stop`` is set.
    """
    stream = stream or bus.cfg.events_stream
    info = await bus.js.stream_info(stream)
    target = info.state.last_seq if until_seq is None else min(until_seq, info.state.last_seq)
    start = await asyncio.to_thread(store.last_seq)
    if target <= start:
        return 0
    applied = 0
    pending: asyncio.Future | None = None
    try:
        async with aclosing(read_raw_batches(bus, stream, start + 1, target, batch)) as batches:
            async for seqs, payloads in batches:
                if pending is not None:  # apply runs in a thread while the next batch is read
                    applied += await pending
                    pending = None
                pending = asyncio.ensure_future(asyncio.to_thread(_decode_and_apply, store, seqs, payloads))
                if stop is not None and stop.is_set():
                    break
    finally:
        if pending is not None:  # never leave an apply running on a store about to be closed
            applied += await pending
    return applied


async def keep_up(store: Any, bus: Bus, follow_batch: int, stop: asyncio.Event,
                  on_applied: Callable[[int, int], None] | None = None, catch_up_batch: int = 100_000,
                  linger: float = 1.0, beside: Any | None = None,
                  on_beside: Callable[[int], None] | None = None) -> None:
    """Keep ``store`` (with ``apply_raw``) up with the log until ``stop``: the live projection.

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
    """
    report = on_applied or (lambda n, last: None)
    while not stop.is_set():
        try:
            applied = await replay_into(store, bus, batch=catch_up_batch, stop=stop)
        except (ReplayGap, ConnectionError, nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("bulk catch-up stopped (%s); following instead", type(exc).__name__)
            applied = 0
        start = await asyncio.to_thread(store.last_seq)
        report(applied, start)
        follow_from = start if beside is None else min(start, await asyncio.to_thread(beside.last_seq))
        async with aclosing(bus.follow_batches(follow_from + 1, follow_batch, 0.2, stop, linger=linger,
                                               decode=beside is not None)) as batches:
            async for batch in batches:
                seqs = [d.seq for d in batch]
                n = await asyncio.to_thread(store.apply_raw, seqs, [d.msg.data for d in batch])
                start = max(start, seqs[-1])
                report(n, start)
                if beside is not None:
                    await asyncio.to_thread(beside.apply, [(d.seq, d.event) for d in batch])
                    if on_beside is not None:
                        on_beside(seqs[-1])
                if len(batch) >= follow_batch:
                    break


def _unlink_store(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + ".wal")):
        leftover.unlink(missing_ok=True)


async def _replay_fresh(bus: Bus, fresh: Path, store_factory: Callable[[Path], Any], stream: str | None,
                        until_seq: int | None, batch: int, seed: Callable[[Any], None] | None,
                        one_transaction: bool, fold_bytes: int) -> tuple[int, int]:
    """Replay into a new store at ``fresh`` and close it (checkpointed: complete without a WAL)."""
    _unlink_store(fresh)
    store = store_factory(fresh)
    try:
        if seed is not None:
            seed(store)
        bulk = hasattr(store, "bulk_load")
        if bulk:
            store.bulk_load(one_transaction, fold_bytes)
        events = await replay_into(store, bus, stream, until_seq, batch)
        if bulk:
            await asyncio.to_thread(store.end_bulk_load)
        return events, store.last_seq()
    finally:
        store.close()


async def rebuild_file(nats: NatsConfig, path: str | Path, store_factory: Callable[[Path], Any],
                       stream: str | None = None, until_seq: int | None = None,
                       swap: bool = True, batch: int = 100_000,
                       seed: Callable[[Any], None] | None = None,
                       fold_bytes: int = BULK_FOLD_BYTES) -> RebuildResult:
    """Replay the log from sequence 1 into ``path``.rebuild, then atomically replace ``path``.

    With ``swap=False`` the fresh file is left at ``path`` itself, which must
    not exist (used to build a copy next to a live store). ``seed``, if given,
    is called with the fresh store before the replay: for state a store keeps
    that does not come from the log (the probe's node cursors). ``fold_bytes``
    bounds the raw events a bulk-loading store holds in memory before folding
    them (``catalog.rebuild_memory_mib``).
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
            events, last = await _replay_fresh(bus, fresh, store_factory, stream, until_seq, batch, seed, True,
                                               fold_bytes)
        except BulkRejected as exc:  # a malformed message: replay again batch by batch, which skips it
            log.warning("one-transaction rebuild rolled back (%s); replaying batch by batch", exc)
            events, last = await _replay_fresh(bus, fresh, store_factory, stream, until_seq, batch, seed, False,
                                               fold_bytes)
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
