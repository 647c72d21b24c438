"""Catalog: the DuckDB metadata store rebuilt from the log, and its query API."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.catalog.api import build_app
from services.catalog.projection import CatalogStore
from shared.bus import Bus
from shared.config import Config
from shared.runtime import run_until_stopped, running_service

log = logging.getLogger("switchyard.catalog")


async def project(cfg: Config, bus: Bus, store: CatalogStore, registry: CollectorRegistry,
                  stop: asyncio.Event) -> None:
    applied = Counter("switchyard_catalog_events_applied", "Events applied to the catalog", registry=registry)
    last = Gauge("switchyard_catalog_last_seq", "Last applied stream sequence", registry=registry)
    start = await asyncio.to_thread(store.last_seq)
    last.set(start)
    log.info("projecting from stream sequence %d", start + 1)
    async for batch in bus.follow_batches(start + 1, cfg.catalog.batch, 0.2, stop):
        n = await asyncio.to_thread(store.apply, [(d.seq, d.event) for d in batch])
        applied.inc(n)
        last.set(batch[-1].seq)


async def main(cfg: Config) -> None:
    async with running_service("catalog", cfg) as svc:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        store = CatalogStore(cfg.catalog.db_path)
        svc.stack.callback(store.close)
        runner = web.AppRunner(build_app(store, cfg.catalog.token), access_log=None)
        await runner.setup()
        svc.stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, cfg.catalog.http_host, cfg.catalog.http_port).start()
        projector = asyncio.create_task(project(cfg, svc.bus, store, svc.registry, svc.stop), name="projection")
        svc.serve_metrics(cfg.catalog.metrics_port)
        log.info("catalog API on %s:%d", cfg.catalog.http_host, cfg.catalog.http_port)
        await run_until_stopped(svc.stop, [projector])
