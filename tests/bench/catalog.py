"""Catalog benchmark: rebuild speed from a synthetic log, read and apply alone, and trail latency.

The log holds N instances with their received, placed, forwarded and verified
events (4N events), published with JetStream async publish into a bench
nats-server on free ports (timed separately). Figures:

- rebuild: ``shared.readmodel.replay.rebuild_file`` into a fresh DuckDB
  file (what ``switchyard catalog rebuild`` runs), events/s end to end;
- read alone: the replay reader with no store (raw socket reader), and, as the
  baseline, the nats-py subscription reader, on a sample of the log;
- live catch-up: the catalog service's loop (``follow.keep_up``) on a fresh
  store over the sample's events;
- apply alone: ``CatalogStore.apply_raw`` on encoded events held in memory,
  in batches, on a sample (a store without ``bulk_load``, as the live catch-up);
- baseline (same run): the foundation's row-by-row apply (one execute per row)
  on a small sample;
- trail latency: p50/p99 of the instance-trail queries over random instances.

    .venv/bin/python -m tests.bench catalog [--instances=N] [--sample-instances=N]   (just bench catalog)

(flags need '=': bare words are areas)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
import nats

from services.catalog import api
from shared import events as ev
from shared import natsauth
from shared.bus import Bus, subject_for
from shared.config import Config, NatsConfig
from shared.readmodel import follow, replay
from shared.readmodel.catalog import _RECEIVED_COLUMNS, SCHEMA, CatalogStore
from shared.readmodel.replay import rebuild_file
from switchyard import stack as ls
from tests.fixtures.util import free_port

NODES = ("node1", "node2", "node3")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def instance_events(
    i: int,
) -> tuple[ev.InstanceReceivedV1, ev.InstancePlacedV1, ev.InstanceForwardedV1, ev.InstanceVerifiedV1]:
    """received, placed, forwarded, verified for instance i (10 instances a series, 100 a study)."""
    study, series = f"1.2.826.0.1.3680043.10.1.{i // 100}", f"1.2.826.0.1.3680043.10.2.{i // 10}"
    sop = f"1.2.826.0.1.3680043.10.3.{i}"
    node = NODES[(i // 100) % 3]
    at = T0 + timedelta(milliseconds=i)
    digest = f"{i:064x}"
    placed_id = f"p{i}"
    return (
        ev.InstanceReceivedV1(
            event_id=f"r{i}",
            occurred_at=at,
            sop_instance_uid=sop,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study,
            series_instance_uid=series,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            blob_key=f"sha256/{digest[:2]}/{digest}",
            size=530_000,
            dataset_digest=digest,
            calling_ae="BENCHSCU",
            called_ae="SWITCHYARD",
            modality="CT",
            patient_id=f"P{i // 1000:06d}",
            patient_name="BENCH^PATIENT",
            patient_birth_date="19700101",
            accession_number=f"A{i // 100:08d}",
            study_date="20260101",
            study_description="BENCH CT",
            series_number=str(i // 10 % 10 + 1),
            instance_number=str(i % 10 + 1),
            extra_tags={"Manufacturer": "BENCH"},
        ),
        ev.InstancePlacedV1(
            event_id=placed_id,
            occurred_at=at,
            sop_instance_uid=sop,
            study_instance_uid=study,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            blob_key=f"sha256/{digest[:2]}/{digest}",
            dataset_digest=digest,
            node_id=node,
            reason=ev.PlacementReason.NEW_STUDY if i % 100 == 0 else ev.PlacementReason.AFFINITY,
            candidates=[ev.Candidate(n, 0.1 * k) for k, n in enumerate(NODES)],
            received_seq=4 * i + 1,
        ),
        ev.InstanceForwardedV1(
            event_id=f"f{i}",
            occurred_at=at,
            sop_instance_uid=sop,
            study_instance_uid=study,
            node_id=node,
            placement_id=placed_id,
            duration_ms=3.5,
        ),
        ev.InstanceVerifiedV1(
            event_id=f"v{i}", occurred_at=at, sop_instance_uid=sop, node_id=node, dataset_digest=digest
        ),
    )


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


async def publish_log(cfg: NatsConfig, n: int) -> float:
    nc = await nats.connect(cfg.url, **natsauth.connect_options(cfg, natsauth.HARNESS))  # writes every event type
    try:
        await Bus(nc, cfg).ensure_streams()
        js = nc.jetstream(timeout=60, publish_async_max_pending=50000)
        started = time.perf_counter()
        for ids in chunks(n, 5000):
            for i in ids:
                for e in instance_events(i):
                    await js.publish_async(subject_for(e), ev.encode(e))
        await asyncio.wait_for(js.publish_async_completed(), 600)
        seconds = time.perf_counter() - started
        info = await js.stream_info(cfg.events_stream)
        assert info.state.messages == 4 * n, f"stream holds {info.state.messages}, expected {4 * n}"
        return seconds
    finally:
        await nc.close()


async def read_alone(cfg: NatsConfig, events: int, client: bool) -> float:
    """Seconds to read the first ``events`` of the log with no store: the wire reader, or nats-py's."""
    once = asyncio.Event()
    once.set()
    bus = await Bus.connect(cfg, "bench-read", once)
    try:
        reader = replay._read_with_client if client else replay.read_raw_batches
        started = time.perf_counter()
        count = 0
        async for seqs, _ in reader(bus, cfg.events_stream, 1, events, 100_000):
            count += len(seqs)
        assert count == events, f"read {count} of {events}"
        return time.perf_counter() - started
    finally:
        await bus.close()


async def live_catch_up(cfg: NatsConfig, path: Path, events: int) -> float:
    """Seconds for the live projection loop (``keep_up``) to catch a fresh store up over the first ``events``."""
    once = asyncio.Event()
    once.set()
    bus = await Bus.connect(cfg, "bench-catch-up", once, identity="catalog")
    store = CatalogStore(path)
    try:
        stop = asyncio.Event()

        def report(_: int, last: int) -> None:
            if last >= events:
                stop.set()

        started = time.perf_counter()
        await follow.keep_up(store, bus, 512, stop, report)
        seconds = time.perf_counter() - started
        assert store.last_seq() >= events
        return seconds * events / store.last_seq()  # it stops at a batch boundary
    finally:
        store.close()
        await bus.close()


def apply_alone(path: Path, n: int, batch: int) -> tuple[float, int]:
    """Time only CatalogStore.apply_raw and the closing checkpoint; events are encoded outside the clock."""
    store = CatalogStore(path)
    seconds, seq = 0.0, 0
    try:
        per_batch = batch // 4
        for ids in chunks(n, per_batch):
            seqs, payloads = [], []
            for i in ids:
                for e in instance_events(i):
                    seq += 1
                    seqs.append(seq)
                    payloads.append(ev.encode(e))
            t = time.perf_counter()
            store.apply_raw(seqs, payloads)
            seconds += time.perf_counter() - t
    finally:
        t = time.perf_counter()
        store.close()
        seconds += time.perf_counter() - t
    return seconds, seq


def row_by_row_baseline(path: Path, n: int) -> float:
    """The foundation's apply: one execute per event and per row (its code, condensed)."""
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    enc = msgspec.json.Encoder()
    utc = lambda at: at.astimezone(UTC).replace(tzinfo=None)  # noqa: E731
    seq, seconds = 0, 0.0
    rows = []
    for i in range(n):
        for event in instance_events(i):
            seq += 1
            rows.append((seq, ev.decode(ev.encode(event))))
    t = time.perf_counter()
    con.execute("BEGIN")
    for seq, e in rows:
        assert not isinstance(e, (ev.NodeHeartbeatV1, ev.NodeStateChangedV1))  # instance events only
        con.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                seq,
                e.event_id,
                type(e).__struct_config__.tag,
                getattr(e, "sop_instance_uid", None),
                getattr(e, "study_instance_uid", None),
                e.node_id if hasattr(e, "node_id") else None,
                utc(e.occurred_at),
                enc.encode(e).decode(),
            ],
        )
        if isinstance(e, ev.InstanceReceivedV1):
            con.execute(
                f"INSERT OR REPLACE INTO instances ({', '.join(_RECEIVED_COLUMNS)}, received_at,"
                f" received_seq, extra_tags) VALUES ({', '.join('?' * len(_RECEIVED_COLUMNS))}, ?, ?, ?)",
                [
                    *(getattr(e, c) for c in _RECEIVED_COLUMNS),
                    utc(e.occurred_at),
                    seq,
                    enc.encode(e.extra_tags).decode(),
                ],
            )
        elif isinstance(e, ev.InstancePlacedV1):
            con.execute(
                "INSERT OR REPLACE INTO locations VALUES (?, ?, ?, 'placed', ?, ?, '', ?, ?, '')",
                [e.sop_instance_uid, e.study_instance_uid, e.node_id, e.event_id, e.reason, seq, utc(e.occurred_at)],
            )
        elif isinstance(e, ev.InstanceForwardedV1):
            con.execute(
                "UPDATE locations SET state = 'forwarded', detail = '', updated_seq = ?, updated_at = ?"
                " WHERE sop_instance_uid = ? AND placement_id = ?",
                [seq, utc(e.occurred_at), e.sop_instance_uid, e.placement_id],
            )
        elif isinstance(e, ev.InstanceVerifiedV1):
            con.execute(
                "UPDATE locations SET state = 'verified', updated_seq = ?, updated_at = ?"
                " WHERE sop_instance_uid = ? AND node_id = ?",
                [seq, utc(e.occurred_at), e.sop_instance_uid, e.node_id],
            )
    con.execute("COMMIT")
    seconds = time.perf_counter() - t
    con.close()
    return seconds


def trail_latency(path: Path, n: int, lookups: int) -> tuple[float, float]:
    """The two queries the trail endpoint runs, on random instances; milliseconds."""
    con = duckdb.connect(str(path), read_only=True)
    rng = random.Random(7)
    times = []
    trail_sql = api._TRAIL_SQL.format("sop_instance_uid = ?")
    summary_sql = api._SUMMARY_SQL.format("i.sop_instance_uid = ?")
    try:
        for _ in range(lookups):
            sop = f"1.2.826.0.1.3680043.10.3.{rng.randrange(n)}"
            t = time.perf_counter()
            events = con.execute(trail_sql, [sop]).fetchall()
            con.execute(summary_sql, [sop]).fetchall()
            times.append((time.perf_counter() - t) * 1000)
            assert len(events) == 4
    finally:
        con.close()
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def bench_nats(work: Path) -> tuple[Config, ls.Proc]:
    """A nats-server of the bench's own, for a synthetic log.

    JetStream's default sync: fsyncing each of millions of synthetic events would
    take most of an hour to publish, and the rebuild only reads.
    """
    cfg, creds = natsauth.secure_local(
        Config(nats=NatsConfig(url=f"nats://127.0.0.1:{free_port()}")), work, (*natsauth.IDENTITIES, natsauth.HARNESS)
    )  # auth on, as deployed
    return cfg, ls.start_nats(cfg, work, free_port(), sync_always=False, extra_conf=natsauth.server_conf(creds))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench catalog")
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=100_000, help="events per apply batch")
    p.add_argument("--sample-instances", type=int, default=100_000, help="for read alone and apply alone")
    p.add_argument("--baseline-instances", type=int, default=1000)
    p.add_argument("--lookups", type=int, default=500)
    args = p.parse_args(argv)
    n = args.instances
    work = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    cfg, proc = bench_nats(work)
    try:
        print(f"catalog bench: {n} instances, {4 * n} events, apply batch {args.batch}; load {load()}", flush=True)
        pub_s = asyncio.run(publish_log(cfg.nats, n))
        print(f"publish the synthetic log (JetStream async): {4 * n / pub_s:,.0f} events/s ({pub_s:.1f}s)", flush=True)

        print(f"load before the rebuild: {load()}", flush=True)
        result = asyncio.run(
            rebuild_file(cfg.nats, work / "rebuilt.duckdb", CatalogStore, swap=False, batch=args.batch)
        )
        assert result.events == 4 * n and result.last_seq == 4 * n
        print(
            f"rebuild (read + apply + checkpoint): {result.events / result.seconds:,.0f} events/s, "
            f"{result.seconds:.1f}s for {result.events} events; load after {load()}",
            flush=True,
        )

        ns = min(args.sample_instances, n)
        wire_s = asyncio.run(read_alone(cfg.nats, 4 * ns, client=False))
        client_s = asyncio.run(read_alone(cfg.nats, 4 * ns, client=True))
        print(
            f"read alone ({4 * ns} events): wire reader {4 * ns / wire_s:,.0f} events/s, "
            f"baseline nats-py reader {4 * ns / client_s:,.0f} events/s",
            flush=True,
        )

        catch_s = asyncio.run(live_catch_up(cfg.nats, work / "live.duckdb", 4 * ns))
        print(f"live catch-up (keep_up, {4 * ns} events): {4 * ns / catch_s:,.0f} events/s", flush=True)

        alone_s, count = apply_alone(work / "alone.duckdb", ns, args.batch)
        print(f"apply alone ({count} events, in memory): {count / alone_s:,.0f} events/s ({alone_s:.1f}s)", flush=True)

        nb = min(args.baseline_instances, n)
        base_s = row_by_row_baseline(work / "baseline.duckdb", nb)
        print(f"baseline row-by-row apply ({4 * nb} events): {4 * nb / base_s:,.0f} events/s", flush=True)

        p50, p99 = trail_latency(work / "rebuilt.duckdb", n, args.lookups)
        print(
            f"instance trail ({args.lookups} lookups over {4 * n} events): p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            flush=True,
        )
        size = (work / "rebuilt.duckdb").stat().st_size
        print(f"rebuilt file: {size / 2**20:,.0f} MiB; load at the end {load()}", flush=True)
        return 0
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)
