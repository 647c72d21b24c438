"""Probe: watches every Orthanc node and publishes its heartbeat.

Each interval, per node: REST /statistics and /jobs (load), a C-ECHO round
trip (the DICOM path the forwarder uses is alive), then one heartbeat with the
fields the scheduler scores on. An unreachable node is reported as down, with
the reason, rather than going silent.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Gauge

from services.catalog.projection import CatalogStore
from services.catalog.rebuild import keep_up
from services.probe import qr
from services.probe.health import enrich
from services.probe.store import ProbeStore
from services.probe.verify import LOG_BATCH, LOG_LINGER_S, Verifier
from shared import events as ev
from shared import membership, ul
from shared.blobs import open_blob_store
from shared.bus import Bus, BusUnavailable, PublishUncertain
from shared.config import Config, NodeConfig
from shared.orthanc import OrthancClient, OrthancError
from shared.runtime import run_until_stopped, running_service, wait_or_stop

log = logging.getLogger("switchyard.probe")


async def echo_rtt_ms(node: NodeConfig, calling_ae: str, timeout: float) -> float | None:
    """C-ECHO round trip including association setup and release; None when it fails.

    On the event loop (shared.ul): pynetdicom's association would start two
    polling threads for every look at every node.
    """
    started = time.perf_counter()
    ok = await ul.echo(node.host, node.dicom_port, calling_ae, node.ae_title, timeout)
    return (time.perf_counter() - started) * 1000 if ok else None


def _load(client: OrthancClient) -> tuple[dict, int]:
    return client.statistics(), client.pending_jobs()


async def observe(node: NodeConfig, calling_ae: str, timeout: float,
                  client: OrthancClient | None = None) -> ev.NodeHeartbeatV1:
    """One look at one node: REST on a worker thread (http.client blocks), C-ECHO on the loop.

    ``client``: the watch's own, so its keep-alive connection serves every look.
    """
    now = ev.utcnow()
    event_id = ev.fact_id("heartbeat", node.id, now.isoformat())
    client = client or OrthancClient(node, timeout)
    try:
        stats, pending = await asyncio.to_thread(_load, client)
    except (OrthancError, ValueError, KeyError) as exc:
        return ev.NodeHeartbeatV1(event_id=event_id, occurred_at=now, node_id=node.id, up=False,
                                  error=f"REST: {exc}")
    rtt = await echo_rtt_ms(node, calling_ae, timeout)
    extra = await asyncio.to_thread(enrich, client)
    return ev.NodeHeartbeatV1(
        event_id=event_id, occurred_at=now, node_id=node.id, up=rtt is not None,
        error="" if rtt is not None else "C-ECHO failed",
        pending_jobs=pending, instance_count=int(stats.get("CountInstances", 0)),
        disk_used_bytes=int(stats.get("TotalDiskSize", 0)), rtt_ms=None if rtt is None else round(rtt, 3),
        **extra,
    )


async def watch(cfg: Config, member: membership.Member, bus: Bus, up_gauge: Gauge, beats: Counter,
                stop: asyncio.Event) -> None:
    pcfg = cfg.probe
    was_up: bool | None = None
    client: OrthancClient | None = None
    while not stop.is_set() and not member.removed:
        node = member.node
        if client is None or client.node != node:  # a node's address or credentials can change at run time
            if client is not None:
                client.close()
            client = OrthancClient(node, pcfg.timeout_s)
        started = time.monotonic()
        try:
            hb = await observe(node, pcfg.ae_title, pcfg.timeout_s, client)
        except Exception as exc:  # noqa: BLE001 - a node's watch must outlive any one bad look
            log.exception("observing node %s failed", node.id)
            hb = ev.NodeHeartbeatV1(event_id=ev.fact_id("heartbeat", node.id, ev.utcnow().isoformat()),
                                    node_id=node.id, up=False, error=f"probe: {type(exc).__name__}")
        up_gauge.labels(node=node.id).set(1 if hb.up else 0)
        if hb.up != was_up:
            log.info("node %s is %s%s", node.id, "up" if hb.up else "down", f" ({hb.error})" if hb.error else "")
            was_up = hb.up
        try:
            await bus.publish(hb)
            beats.labels(node=node.id).inc()
        except (BusUnavailable, PublishUncertain) as exc:
            log.warning("heartbeat for %s not published: %s", node.id, exc)
        await wait_or_stop(stop, max(0.0, pcfg.interval_s - (time.monotonic() - started)))


async def project(bus: Bus, store: CatalogStore, last: Gauge, verifier: Verifier, stop: asyncio.Event) -> None:
    """The front door's own projection of the log (same tables as the catalog, own file), and beside it
    the verification store, from one follower: each reads every event, and two followers cost the
    probe and nats-server a delivery per event each."""
    last.set(await asyncio.to_thread(store.last_seq))
    verify_start = await asyncio.to_thread(verifier.store.last_seq)
    log.info("verification store follows the log from stream sequence %d", verify_start + 1)
    verifier.log_seq.set(verify_start)
    await keep_up(store, bus, LOG_BATCH, stop, on_applied=lambda _n, seq: last.set(seq), linger=LOG_LINGER_S,
                  beside=verifier.store, on_beside=verifier.log_seq.set)


async def main(cfg: Config) -> None:
    async with running_service("probe", cfg) as svc:
        up_gauge = Gauge("switchyard_probe_node_up", "1 when the node answered REST and C-ECHO", ["node"],
                         registry=svc.registry)
        beats = Counter("switchyard_probe_heartbeats", "Heartbeats published", ["node"], registry=svc.registry)
        # Nodes come from the log (config seeds them): nodes added at run time are watched too.
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        store = ProbeStore(cfg.probe.db_path)
        svc.stack.callback(store.close)
        verifier = Verifier(cfg, store, svc.bus, svc.registry)
        watches: dict[str, asyncio.Task] = {}
        verifies: dict[str, asyncio.Task] = {}

        def ensure_watch(member: membership.Member, _event=None) -> None:
            node_id = member.node.id
            if member.removed:
                return
            task = watches.get(node_id)
            if task is None or task.done():
                watches[node_id] = asyncio.create_task(watch(cfg, member, svc.bus, up_gauge, beats, svc.stop),
                                                       name=f"watch-{node_id}")
            if node_id not in verifies:
                verifies[node_id] = asyncio.create_task(verifier.watch(member.node, svc.stop),
                                                        name=f"verify-{node_id}")

        for member in pool.active():
            ensure_watch(member)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, ensure_watch), name="membership")
        catalog = CatalogStore(cfg.probe.catalog_db_path)
        svc.stack.callback(catalog.close)
        qr_seq = Gauge("switchyard_probe_qr_last_seq", "Last stream sequence in the front door's store",
                       registry=svc.registry)
        projector = asyncio.create_task(project(svc.bus, catalog, qr_seq, verifier, svc.stop),
                                        name="log-projections")
        server, _ = qr.start(cfg, catalog, open_blob_store(cfg.blobs))
        svc.stack.callback(server.shutdown)
        log.info("Q/R SCP %s on %s:%d%s", cfg.probe.qr_ae_title, cfg.probe.qr_host, cfg.probe.qr_port,
                 " (TLS)" if cfg.probe.qr_tls_cert_file else "")
        svc.serve_metrics(cfg.probe.metrics_port)
        log.info("watching nodes %s every %.1fs", ", ".join(m.node.id for m in pool.active()), cfg.probe.interval_s)
        # Heartbeat watches end by themselves when their node is removed; these must not end.
        await run_until_stopped(svc.stop, [follower, projector])
        await asyncio.gather(*watches.values(), *verifies.values(), return_exceptions=True)
