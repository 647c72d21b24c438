"""Probe: three jobs, wired here.

- heartbeats (services.probe.watch): each node's load and C-ECHO, every interval;
- verified delivery (services.probe.verify, store): what was forwarded is checked
  on its node's /changes feed and dataset digest, and published verified or failed;
- the Q/R front door (services.probe.qr): C-FIND/C-MOVE/C-GET over its own copy
  of the catalog projection (shared.readmodel.catalog), fed from the log.

One live follower feeds both log projections (the front door's and the verification store).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge

from services.probe import qr
from services.probe.store import ProbeStore
from services.probe.verify import LOG_BATCH, LOG_LINGER_S, Verifier
from services.probe.watch import watch
from shared import membership
from shared.blobs import open_blob_store
from shared.bus import Bus
from shared.config import Config
from shared.natsmon import NatsMonitorCollector
from shared.readmodel.catalog import CatalogStore
from shared.readmodel.follow import keep_up
from shared.runtime import run_until_stopped, running_service

log = logging.getLogger("switchyard.probe")


async def project(bus: Bus, store: CatalogStore, last: Gauge, verifier: Verifier, stop: asyncio.Event) -> None:
    """The front door's own projection of the log (same tables as the catalog, own file), and beside it
    the verification store, from one follower: each reads every event, and two followers cost the
    probe and nats-server a delivery per event each."""
    last.set(await asyncio.to_thread(store.last_seq))
    verify_start = await asyncio.to_thread(verifier.store.last_seq)
    log.info("verification store follows the log from stream sequence %d", verify_start + 1)
    verifier.log_seq.set(verify_start)
    await keep_up(
        store,
        bus,
        LOG_BATCH,
        stop,
        on_applied=lambda _n, seq: last.set(seq),
        linger=LOG_LINGER_S,
        beside=verifier.store,
        on_beside=verifier.log_seq.set,
    )


async def main(cfg: Config) -> None:
    async with running_service("probe", cfg) as svc:
        up_gauge = Gauge(
            "switchyard_probe_node_up", "1 when the node answered REST and C-ECHO", ["node"], registry=svc.registry
        )
        beats = Counter("switchyard_probe_heartbeats", "Heartbeats published", ["node"], registry=svc.registry)
        if cfg.probe.nats_monitor_url:
            svc.registry.register(NatsMonitorCollector(cfg.probe.nats_monitor_url))
        # Nodes come from the log (config seeds them): nodes added at run time are watched too.
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        store = ProbeStore(cfg.probe.db_path)
        svc.stack.callback(store.close)
        verifier = Verifier(cfg, store, svc.bus, svc.registry, svc.tracer)
        watches: dict[str, asyncio.Task] = {}
        verifies: dict[str, asyncio.Task] = {}

        def ensure_watch(member: membership.Member, _event=None) -> None:
            node_id = member.node.id
            if member.removed:
                return
            task = watches.get(node_id)
            if task is None or task.done():
                watches[node_id] = asyncio.create_task(
                    watch(cfg, member, svc.bus, up_gauge, beats, svc.stop), name=f"watch-{node_id}"
                )
            if node_id not in verifies:
                verifies[node_id] = asyncio.create_task(verifier.watch(member.node, svc.stop), name=f"verify-{node_id}")

        for member in pool.active():
            ensure_watch(member)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, ensure_watch), name="membership")
        catalog = CatalogStore(cfg.probe.catalog_db_path)
        svc.stack.callback(catalog.close)
        qr_seq = Gauge(
            "switchyard_probe_qr_last_seq", "Last stream sequence in the front door's store", registry=svc.registry
        )
        projector = asyncio.create_task(project(svc.bus, catalog, qr_seq, verifier, svc.stop), name="log-projections")
        server, _ = qr.start(
            cfg, catalog, open_blob_store(cfg.blobs), lambda node: m.node.ae_title if (m := pool.get(node)) else ""
        )
        svc.stack.callback(server.shutdown)
        log.info(
            "Q/R SCP %s on %s:%d%s",
            cfg.probe.qr_ae_title,
            cfg.probe.qr_host,
            cfg.probe.qr_port,
            " (TLS)" if cfg.probe.qr_tls_cert_file else "",
        )
        svc.serve_metrics(cfg.probe.metrics_port, followers=1)  # the log projections
        log.info("watching nodes %s every %.1fs", ", ".join(m.node.id for m in pool.active()), cfg.probe.interval_s)
        # Heartbeat watches end by themselves when their node is removed; these must not end.
        await run_until_stopped(svc.stop, [follower, projector])
        await asyncio.gather(*watches.values(), *verifies.values(), return_exceptions=True)
