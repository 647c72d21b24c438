"""Catalog: the DuckDB metadata store rebuilt from the log, and its query API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import msgspec
from aiohttp import web
from nats.js.errors import NotFoundError
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.catalog.api import build_app, runner_options, ssl_context
from shared import events as ev
from shared import membership, natsauth, telemetry
from shared.bus import Bus, node_token
from shared.config import Config
from shared.readmodel.catalog import CatalogStore
from shared.readmodel.follow import keep_up
from shared.runtime import run_until_stopped, running_service

log = logging.getLogger("switchyard.catalog")


class _TraceFields(msgspec.Struct):
    """Only an event's trace context (every other field is skipped by the decoder)."""

    traceparent: str = ""
    tracestate: str = ""


_trace_fields = msgspec.json.Decoder(_TraceFields)


class TracedCatalogStore(CatalogStore):
    """The catalog's store, with one span per applied batch linking the spans that produced its events.

    Links, not parents: a batch holds events of many traces. The links are
    read (one small decode per event) only when the span is recorded.
    """

    def __init__(self, path: str, tracer: trace.Tracer) -> None:
        super().__init__(path)
        self.tracer = tracer

    def apply_raw(self, seqs: list[int], payloads: list[bytes]) -> int:
        with telemetry.span(self.tracer, "catalog.apply", kind=trace.SpanKind.CONSUMER) as span:
            if span.is_recording():
                span.set_attributes(
                    {
                        **telemetry.messaging_attributes("dicom.instance.>", "process"),
                        "messaging.batch.message_count": len(payloads),
                    }
                )
                for link in telemetry.links_to(_contexts(payloads)):
                    span.add_link(link.context)
            return super().apply_raw(seqs, payloads)


def _contexts(payloads: list[bytes]) -> Iterator[tuple[str, str]]:
    for data in payloads:
        try:
            fields = _trace_fields.decode(data)
        except msgspec.DecodeError:
            continue
        yield fields.traceparent, fields.tracestate


async def project(cfg: Config, bus: Bus, store: CatalogStore, registry: CollectorRegistry, stop: asyncio.Event) -> None:
    applied = Counter("switchyard_catalog_events_applied", "Events applied to the catalog", registry=registry)
    last = Gauge("switchyard_catalog_last_seq", "Last applied stream sequence", registry=registry)
    start = await asyncio.to_thread(store.last_seq)
    last.set(start)
    log.info("projecting from stream sequence %d", start + 1)

    def report(n: int, seq: int) -> None:
        applied.inc(n)
        last.set(seq)

    await keep_up(store, bus, cfg.catalog.batch, stop, report, linger=cfg.catalog.follow_linger_s)


async def follow_heartbeats(cfg: Config, bus: Bus, loads: dict, stop: asyncio.Event) -> None:
    """Keep the latest heartbeat per node (telemetry: memory only, not in the audit store)."""
    while not stop.is_set():
        try:
            async for batch in bus.follow_batches(1, 256, 0.2, stop, stream=cfg.nats.heartbeats_stream):
                for d in batch:
                    if isinstance(d.event, ev.NodeHeartbeatV1):
                        load = msgspec.to_builtins(d.event)
                        for key in ("type", "event_id", "traceparent", "tracestate"):
                            load.pop(key, None)
                        loads[d.event.node_id] = load
        except Exception as exc:  # noqa: BLE001 - loads are best effort; the audit projection must go on
            log.warning("heartbeat follower stopped (%s); retrying", type(exc).__name__)
            await asyncio.sleep(1.0)


async def main(cfg: Config) -> None:
    async with running_service("catalog", cfg) as svc:
        if cfg.catalog.token:
            log.warning(
                "catalog.token is deprecated: it is taken as an operator token; list hashed tokens with"
                " roles in catalog.tokens instead (docs/security.md)"
            )
        if not cfg.catalog.tokens and not cfg.catalog.token:
            log.warning("no catalog.tokens configured: every API request is refused (401)")
        store = TracedCatalogStore(cfg.catalog.db_path, svc.tracer)
        svc.stack.callback(store.close)
        loads: dict = {}
        # Membership as the services see it (node states, and the console's node actions).
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        bus = svc.bus

        async def log_last_seq() -> int:
            info = await bus.js.stream_info(cfg.nats.events_stream)
            return int(info.state.last_seq)

        async def consumer_lag() -> dict[str, dict[str, int] | None]:
            """The scheduler's durables and each member's forwarder durable (None: not created yet)."""
            names = [*natsauth.SCHEDULER_DURABLES, *(f"forwarder-{node_token(m.node.id)}" for m in pool.active())]

            async def one(name: str) -> dict[str, int] | None:
                try:
                    info = await bus.js.consumer_info(cfg.nats.events_stream, name)
                except NotFoundError:
                    return None
                return {
                    "num_pending": int(info.num_pending or 0),
                    "num_ack_pending": int(info.num_ack_pending or 0),
                    "num_redelivered": int(info.num_redelivered or 0),
                }

            return dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))

        app = build_app(
            store,
            cfg.catalog,
            loads,
            tuple(n.id for n in cfg.nodes),
            publish=bus.publish,
            pool=pool,
            routing=cfg.routing,
            stream_last_seq=log_last_seq,
            consumer_lag=consumer_lag,
            trace_url_template=cfg.telemetry.trace_url_template,
        )
        runner = web.AppRunner(app, **runner_options(cfg.catalog))
        await runner.setup()
        svc.stack.push_async_callback(runner.cleanup)
        tls = ssl_context(cfg.catalog)
        await web.TCPSite(runner, cfg.catalog.http_host, cfg.catalog.http_port, ssl_context=tls).start()
        projector = asyncio.create_task(project(cfg, svc.bus, store, svc.registry, svc.stop), name="projection")
        heartbeats = asyncio.create_task(follow_heartbeats(cfg, svc.bus, loads, svc.stop), name="heartbeats")
        members = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop), name="membership")
        svc.serve_metrics(cfg.catalog.metrics_port, followers=2)  # projection (after catch-up), heartbeats
        log.info(
            "catalog API on %s://%s:%d (%d tokens)",
            "https" if tls else "http",
            cfg.catalog.http_host,
            cfg.catalog.http_port,
            len(cfg.catalog.tokens) + bool(cfg.catalog.token),
        )
        await run_until_stopped(svc.stop, [projector, heartbeats, members])
