"""Probe store rebuild benchmark: the verification store's apply, batched vs row by row.

Synthetic log from the catalog benchmark (received, placed, forwarded,
verified per instance). Figures:

- apply alone: ``ProbeStore.apply`` on decoded events in batches (verified
  events carry their placement id, as the probe publishes them, so each one
  settles its expectation);
- baseline (same run): the previous row-by-row apply (one execute per event,
  its code condensed below) on a sample;
- replay+apply: ``rebuild_file`` into a fresh file, what ``switchyard probe
  rebuild`` runs for ``probe.db_path`` (the catalog benchmark's published log,
  whose verified events carry no placement id: they only advance the sequence).

    .venv/bin/python -m tests.bench probe_rebuild [--instances=N] [--baseline-instances=N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from datetime import UTC
from pathlib import Path

import duckdb
import msgspec

from services.probe.store import NAME, SCHEMA, ProbeStore
from shared import events as ev
from shared.readmodel.replay import rebuild_file
from tests.bench.catalog import bench_nats, chunks, instance_events, publish_log


def probe_events(i: int) -> list[ev.Event]:
    """The catalog bench's four events of instance i, the verified one with its placement id."""
    received, placed, forwarded, verified = instance_events(i)
    return [
        received,
        placed,
        forwarded,
        msgspec.structs.replace(verified, placement_id=placed.event_id, study_instance_uid=placed.study_instance_uid),
    ]


def decoded(ids) -> list[ev.AnyEvent]:
    return [ev.decode(ev.encode(e)) for i in ids for e in probe_events(i)]


def apply_alone(path: Path, n: int, batch: int) -> tuple[float, int]:
    store = ProbeStore(path)
    seconds, seq = 0.0, 0
    try:
        for ids in chunks(n, batch // 4):
            rows = []
            for e in decoded(ids):
                seq += 1
                rows.append((seq, e))
            t = time.perf_counter()
            store.apply(rows)
            seconds += time.perf_counter() - t
        assert set(store.states().values()) == {"verified"}
    finally:
        store.close()
    return seconds, seq


def row_by_row_baseline(path: Path, n: int) -> float:
    """The previous apply: one execute per event (its code, condensed)."""
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    utc = lambda at: at.astimezone(UTC).replace(tzinfo=None)  # noqa: E731
    rows = list(enumerate(decoded(range(n)), start=1))
    t = time.perf_counter()
    con.execute("BEGIN")
    for _seq, e in rows:
        if isinstance(e, ev.InstancePlacedV1):
            con.execute(
                "INSERT OR REPLACE INTO placements (placement_id, sop_instance_uid, study_instance_uid,"
                " node_id, dataset_digest) VALUES (?, ?, ?, ?, ?)",
                [e.event_id, e.sop_instance_uid, e.study_instance_uid, e.node_id, e.dataset_digest],
            )
        elif isinstance(e, ev.InstanceForwardedV1):
            placed = con.execute(
                "SELECT dataset_digest FROM placements WHERE placement_id = ?", [e.placement_id]
            ).fetchone()
            if placed is not None:
                con.execute("DELETE FROM placements WHERE placement_id = ?", [e.placement_id])
                con.execute(
                    "INSERT OR REPLACE INTO expected (node_id, sop_instance_uid, study_instance_uid,"
                    " placement_id, dataset_digest, forwarded_at, state, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending', '')",
                    [
                        e.node_id,
                        e.sop_instance_uid,
                        e.study_instance_uid,
                        e.placement_id,
                        placed[0],
                        utc(e.occurred_at),
                    ],
                )
        elif isinstance(e, ev.InstanceVerifiedV1) and e.placement_id:
            con.execute(
                "UPDATE expected SET state = 'verified', detail = '' WHERE node_id = ?"
                " AND sop_instance_uid = ? AND placement_id = ?",
                [e.node_id, e.sop_instance_uid, e.placement_id],
            )
    con.execute("INSERT OR REPLACE INTO projection_state VALUES (?, ?)", [NAME, rows[-1][0]])
    con.execute("COMMIT")
    seconds = time.perf_counter() - t
    con.close()
    return seconds


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench probe_rebuild")
    p.add_argument("--instances", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=20000, help="events per apply batch")
    p.add_argument("--baseline-instances", type=int, default=1000)
    args = p.parse_args(argv)
    n = args.instances
    work = Path(tempfile.mkdtemp(prefix="bench-probe-rebuild-"))
    cfg, proc = bench_nats(work)
    try:
        print(f"probe rebuild bench: {n} instances, {4 * n} events, apply batch {args.batch}", flush=True)
        alone_s, count = apply_alone(work / "alone.duckdb", n, args.batch)
        print(f"apply alone (in memory): {count / alone_s:,.0f} events/s ({alone_s:.1f}s)", flush=True)
        nb = min(args.baseline_instances, n)
        base_s = row_by_row_baseline(work / "baseline.duckdb", nb)
        print(f"baseline row-by-row apply ({4 * nb} events): {4 * nb / base_s:,.0f} events/s", flush=True)
        batched_s, _ = apply_alone(work / "batched-sample.duckdb", nb, args.batch)
        print(f"batched apply, same sample: {4 * nb / batched_s:,.0f} events/s", flush=True)

        pub_s = asyncio.run(publish_log(cfg.nats, n))
        print(f"publish (JetStream async): {4 * n / pub_s:,.0f} events/s ({pub_s:.1f}s)", flush=True)
        result = asyncio.run(rebuild_file(cfg.nats, work / "rebuilt.duckdb", ProbeStore, swap=False, batch=args.batch))
        assert result.events == 4 * n and result.last_seq == 4 * n
        print(
            f"rebuild replay+apply: {result.events / result.seconds:,.0f} events/s, "
            f"{result.seconds:.1f}s for {result.events} events",
            flush=True,
        )
        return 0
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)
