"""A log purged under its readers: rebuild, the live follower and the services stop with a clear error.

Before: after a purge ``switchyard catalog rebuild`` waited for events that
were gone (10+ minutes, no output). Purged here with nats-py's JetStream API
on a real nats-server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.readmodel.catalog import CatalogStore
from shared.readmodel.follow import keep_up
from shared.readmodel.replay import LogTruncated, check_log_holds, replay_into
from switchyard import stack as ls
from tests.bench.catalog import instance_events
from tests.fixtures.servers import Stack, run_sync

pytestmark = pytest.mark.integration

INSTANCES = 20
DEADLINE = 60.0


async def connect(stack: Stack, identity: str = "harness") -> Bus:
    """The test writes arbitrary events (harness identity); purging is the admin's right."""
    once = asyncio.Event()
    once.set()
    bus = await Bus.connect(stack.cfg.nats, "test-purge", once, identity=identity)
    await bus.ensure_streams()
    return bus


async def publish(bus: Bus, first: int, count: int) -> None:
    for i in range(first, first + count):
        for e in instance_events(i):
            await bus.publish(e)


def purge(stack: Stack) -> None:
    async def run() -> None:
        bus = await connect(stack, "admin")
        try:
            await bus.js.purge_stream(stack.cfg.nats.events_stream)
        finally:
            await bus.close()

    run_sync(run())


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWITCHYARD_CONFIG": str(stack.config_path)}
    return subprocess.run(
        [sys.executable, "-m", "switchyard", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=ls.REPO,
    )


def test_check_log_holds_rules():
    check_log_holds("s", 0, 1, 10, 10)  # fresh reader, whole log
    check_log_holds("s", 0, 0, 0, 0)  # fresh reader, new stream
    check_log_holds("s", 10, 11, 10, 0)  # purged, but the store has it all
    with pytest.raises(LogTruncated, match="events 1..10 were purged"):
        check_log_holds("s", 0, 11, 10, 0)  # fresh reader, emptied log
    with pytest.raises(LogTruncated, match="events 6..7"):
        check_log_holds("s", 5, 8, 12, 5)
    check_log_holds("s", 5, 8, 12, 5, accepted_start=8)
    with pytest.raises(LogTruncated, match="deleted or replaced"):
        check_log_holds("s", 20, 1, 12, 12)


async def test_rebuild_after_purge_fails_fast_then_accepts_the_loss(nats_only, tmp_path):
    async def fill() -> None:
        bus = await connect(nats_only)
        try:
            await publish(bus, 0, INSTANCES)
        finally:
            await bus.close()

    await fill()
    db = tmp_path / "rebuilt.duckdb"
    ok = cli(nats_only, "catalog", "rebuild", "--db", str(db))
    assert ok.returncode == 0, ok.stderr
    purge(nats_only)
    started = time.monotonic()
    failed = cli(nats_only, "catalog", "rebuild", "--db", str(db))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert time.monotonic() - started < DEADLINE
    assert "purged or truncated" in failed.stderr and "--accept-log-loss" in failed.stderr
    accepted = cli(nats_only, "catalog", "rebuild", "--db", str(db), "--accept-log-loss")
    assert accepted.returncode == 0, accepted.stderr
    probe = cli(
        nats_only, "probe", "rebuild", "--db", str(tmp_path / "p.duckdb"), "--catalog-db", str(tmp_path / "pc.duckdb")
    )
    assert probe.returncode == 1 and "purged or truncated" in probe.stderr, probe.stdout + probe.stderr


async def test_live_follower_stops_on_a_purged_log(nats_only, tmp_path):
    async def scenario() -> None:
        bus = await connect(nats_only)
        store = CatalogStore(str(tmp_path / "live.duckdb"))
        try:
            await publish(bus, 0, INSTANCES)
            assert await replay_into(store, bus) == INSTANCES * 4
            await bus.js.purge_stream(nats_only.cfg.nats.events_stream)
            await publish(bus, INSTANCES, 2)
            # A store that had all of the purged events loses nothing: it keeps up.
            assert await replay_into(store, bus) == 8
            fresh = CatalogStore(str(tmp_path / "fresh.duckdb"))
            try:
                with pytest.raises(
                    LogTruncated, match=f"needs stream sequence 1 but the log now starts at {INSTANCES * 4 + 1}"
                ):
                    await asyncio.wait_for(keep_up(fresh, bus, 100, asyncio.Event()), DEADLINE)
            finally:
                fresh.close()
        finally:
            store.close()
            await bus.close()

    await scenario()


def spawn_service(stack: Stack, service: str) -> ls.Proc:
    env = {
        **os.environ,
        "SWITCHYARD_CONFIG": str(stack.config_path),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ls.REPO),
    }
    return ls.spawn(
        service, [sys.executable, "-m", f"services.{service}"], env, stack.data_dir / "logs" / f"{service}.log"
    )


@pytest.mark.parametrize("service", ["catalog", "scheduler", "probe"])
async def test_service_exits_non_zero_on_a_purged_log(nats_only, service):
    async def fill() -> None:
        bus = await connect(nats_only)
        try:
            await publish(bus, 0, 3)
            await bus.js.purge_stream(nats_only.cfg.nats.events_stream)
        finally:
            await bus.close()

    await fill()
    proc = spawn_service(nats_only, service)
    try:
        code = proc.popen.wait(DEADLINE)
    finally:
        proc.kill()
    log = Path(nats_only.data_dir / "logs" / f"{service}.log").read_text()
    assert code != 0, log
    assert "were purged or truncated" in log and "accepted_log_start" in log, log
