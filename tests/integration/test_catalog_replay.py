"""The replay reader and the live catch-up against a real nats-server.

The wire reader parses deliveries off its own socket; it must read exactly what
nats-py's subscription reads (messages with and without headers, flow control,
a start and a target inside the log), and the live projection's bulk catch-up
must end equal to a rebuild.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.catalog import project
from services.probe.store import ProbeStore
from shared import events as ev
from shared.bus import Bus, subject_for
from shared.readmodel.catalog import CatalogStore
from shared.readmodel.follow import keep_up
from shared.readmodel.replay import _read_with_client, read_raw_batches, rebuild_file, replay_into
from tests.bench.catalog import instance_events
from tests.factories import mixed_log, rich_log
from tests.fixtures.util import dump_all

pytestmark = pytest.mark.integration

INSTANCES = 300


async def connect(cfg) -> Bus:
    once = asyncio.Event()
    once.set()
    bus = await Bus.connect(cfg, "test-replay", once, identity="harness")
    await bus.ensure_streams()
    return bus


async def publish_log(bus: Bus) -> list[bytes]:
    """Instances through Bus.publish (Nats-Msg-Id header: HMSG), the mixed log without headers (MSG)."""
    sent = []
    for i in range(INSTANCES):
        for e in instance_events(i):
            await bus.publish(e)
            sent.append(ev.encode(e))
    for _, logged in mixed_log():
        await bus.js.publish(subject_for(logged), ev.encode(logged))
        sent.append(ev.encode(logged))
    return sent


async def read_all(reader, bus: Bus, start: int, target: int, batch: int) -> tuple[list[int], list[bytes], int]:
    seqs, payloads, batches = [], [], 0
    async for s, p in reader(bus, bus.cfg.events_stream, start, target, batch):
        assert len(s) == len(p) <= batch
        seqs += s
        payloads += p
        batches += 1
    return seqs, payloads, batches


async def test_wire_reader_reads_what_the_client_reads(nats_only):
    async def scenario():
        bus = await connect(nats_only.cfg.nats)
        try:
            sent = await publish_log(bus)
            total = len(sent)
            wire = await read_all(read_raw_batches, bus, 1, total, 97)
            client = await read_all(_read_with_client, bus, 1, total, 97)
            assert wire[:2] == client[:2] == (list(range(1, total + 1)), sent)
            assert wire[2] == -(-total // 97)
            middle = await read_all(read_raw_batches, bus, 101, 1000, 5000)
            assert middle[:2] == (list(range(101, 1001)), sent[100:1000])
        finally:
            await bus.close()

    await scenario()


async def test_live_catch_up_equals_a_rebuild(nats_only, tmp_path):
    cfg = nats_only.cfg

    async def scenario():
        bus = await connect(cfg.nats)
        try:
            sent = await publish_log(bus)
            live = CatalogStore(tmp_path / "live.duckdb")
            live.apply_raw([1, 2, 3], sent[:3])  # a store that was already part way
            stop = asyncio.Event()
            task = asyncio.create_task(project(cfg, bus, live, CollectorRegistry(), stop))
            async with asyncio.timeout(60):
                while await asyncio.to_thread(live.last_seq) < len(sent):
                    await asyncio.sleep(0.05)
            extra = ev.NodeStateChangedV1(event_id="late", node_id="node9", state=ev.NodeState.ADDED)
            await bus.publish(extra)  # followed after the catch-up
            async with asyncio.timeout(30):
                while await asyncio.to_thread(live.last_seq) < len(sent) + 1:
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 10)
            assert await replay_into(live, bus) == 0  # nothing left
            return live
        finally:
            await bus.close()

    live = await scenario()
    # Folded once at the end (the default memory bound), and folded after every batch
    # (a bound smaller than one batch: later folds upsert into filled tables).
    for name, fold_bytes in (("fresh.duckdb", 4 << 30), ("tight.duckdb", 1)):
        fresh = tmp_path / name
        result = await rebuild_file(cfg.nats, fresh, CatalogStore, swap=False, batch=250, fold_bytes=fold_bytes)
        assert result.events == result.last_seq == live.last_seq()
        rebuilt = CatalogStore(fresh)
        for table in ("events", "instances", "locations", "nodes", "projection_state"):
            sql = f"SELECT * FROM {table} ORDER BY ALL"
            assert rebuilt.rows(sql) == live.rows(sql), (name, table)
        rebuilt.close()
    assert live.rows("SELECT count(*) AS n FROM instances")[0]["n"] == INSTANCES + 6
    assert live.rows("SELECT state FROM nodes WHERE node_id = 'node9'") == [{"state": "added"}]


async def test_live_follower_batches_in_order_with_a_bounded_buffer(nats_only):
    """Bus.follow_batches: every event once, in log order, batches never over max_batch,
    a batch closes at its linger, and a slow reader holds the buffer at max_batch."""

    async def scenario():
        bus = await connect(nats_only.cfg.nats)
        stop = asyncio.Event()
        try:
            sent = await publish_log(bus)
            got: list[int] = []
            sizes: list[int] = []
            decoded: list[bool] = []
            async with asyncio.timeout(60):
                async for batch in bus.follow_batches(1, 64, 0.1, stop, linger=0.05, decode=False):
                    sizes.append(len(batch))
                    got += [d.seq for d in batch]
                    decoded += [d.event is None for d in batch]
                    await asyncio.sleep(0.01)  # a slow projection: the callback must wait, not drop
                    if len(got) >= len(sent):
                        break
            assert got == list(range(1, len(sent) + 1))
            assert max(sizes) == 64 and all(decoded)
            # A trickle: one event, then the batch closes at its linger (not at max_batch).
            late = ev.NodeStateChangedV1(event_id="late-follow", node_id="node9", state=ev.NodeState.ADDED)
            await bus.publish(late)
            async with asyncio.timeout(10):
                async for batch in bus.follow_batches(len(sent) + 1, 64, 0.1, stop, linger=0.05):
                    assert [(d.seq, d.event) for d in batch] == [(len(sent) + 1, late)]
                    break
        finally:
            stop.set()
            await bus.close()

    await scenario()


async def test_a_rebuild_over_a_malformed_message_falls_back_and_equals_the_live_store(nats_only, tmp_path, caplog):
    """The one-transaction rebuild cannot skip a message DuckDB refuses: it replays batch by batch instead."""

    async def scenario():
        bus = await connect(nats_only.cfg.nats)
        try:
            sent = []
            for n, (_, e) in enumerate(rich_log()):
                data = b"\xff\xfe not UTF-8" if n == 20 else ev.encode(e)
                await bus.js.publish(subject_for(e), data)
                sent.append(data)
            return sent
        finally:
            await bus.close()

    sent = await scenario()
    live = CatalogStore(tmp_path / "live.duckdb")
    for seq, data in enumerate(sent, start=1):
        live.apply_raw([seq], [data])
    result = await rebuild_file(nats_only.cfg.nats, tmp_path / "fresh.duckdb", CatalogStore, swap=False, batch=7)
    assert result.events == len(sent) - 1 and result.last_seq == len(sent)
    assert any("replaying batch by batch" in r.getMessage() for r in caplog.records)
    rebuilt = CatalogStore(tmp_path / "fresh.duckdb")
    for table in ("events", "instances", "locations", "nodes", "projection_state"):
        sql = f"SELECT * FROM {table} ORDER BY ALL"
        assert rebuilt.rows(sql) == live.rows(sql), table


async def test_one_follower_brings_a_store_beside_up_from_its_own_sequence(nats_only, tmp_path):
    """keep_up(beside=...): the second store (behind the first) is fed from its own last sequence
    by the same follower and ends equal to its rebuild; the first store is not disturbed."""
    cfg = nats_only.cfg

    async def scenario():
        bus = await connect(cfg.nats)
        try:
            sent = await publish_log(bus)
            main = CatalogStore(tmp_path / "main.duckdb")
            await replay_into(main, bus)  # the first store is up to date, the second empty
            beside = ProbeStore(tmp_path / "beside.duckdb")
            seen: list[int] = []
            stop = asyncio.Event()
            task = asyncio.create_task(keep_up(main, bus, 500, stop, linger=0.05, beside=beside, on_beside=seen.append))
            async with asyncio.timeout(60):
                while await asyncio.to_thread(beside.last_seq) < len(sent):
                    await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 10)
            assert seen == sorted(seen) and seen[-1] == len(sent)
            assert main.last_seq() == len(sent)
            main.close()
            beside.close()
        finally:
            await bus.close()

    await scenario()
    fresh = tmp_path / "fresh.duckdb"
    await rebuild_file(cfg.nats, fresh, ProbeStore, swap=False)
    assert dump_all(tmp_path / "beside.duckdb") == dump_all(fresh)
