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
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from shared import events as ev
from shared import membership
from shared.bus import Bus, BusUnavailable, PublishUncertain
from shared.config import Config, NodeConfig
from shared.dimse import NODELAY_HANDLER
from shared.orthanc import OrthancClient, OrthancError
from shared.runtime import run_until_stopped, running_service, wait_or_stop

log = logging.getLogger("switchyard.probe")


def echo_rtt_ms(node: NodeConfig, calling_ae: str, timeout: float) -> float | None:
    """C-ECHO round trip including association setup; None when it fails."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    started = time.perf_counter()
    assoc = ae.associate(node.host, node.dicom_port, ae_title=node.ae_title, evt_handlers=[NODELAY_HANDLER])
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and int(status.Status) == 0
    finally:
        assoc.release()
    return (time.perf_counter() - started) * 1000 if ok else None


def observe(node: NodeConfig, calling_ae: str, timeout: float) -> ev.NodeHeartbeatV1:
    """One look at one node (blocking; run on a worker thread)."""
    now = ev.utcnow()
    event_id = ev.fact_id("heartbeat", node.id, now.isoformat())
    client = OrthancClient(node, timeout)
    try:
        stats = client.statistics()
        pending = client.pending_jobs()
    except (OrthancError, ValueError, KeyError) as exc:
        return ev.NodeHeartbeatV1(event_id=event_id, occurred_at=now, node_id=node.id, up=False,
                                  error=f"REST: {exc}")
    rtt = echo_rtt_ms(node, calling_ae, timeout)
    return ev.NodeHeartbeatV1(
        event_id=event_id, occurred_at=now, node_id=node.id, up=rtt is not None,
        error="" if rtt is not None else "C-ECHO failed",
        pending_jobs=pending, instance_count=int(stats.get("CountInstances", 0)),
        disk_used_bytes=int(stats.get("TotalDiskSize", 0)), rtt_ms=None if rtt is None else round(rtt, 3),
    )


async def watch(cfg: Config, member: membership.Member, bus: Bus, up_gauge: Gauge, beats: Counter,
                stop: asyncio.Event) -> None:
    pcfg = cfg.probe
    was_up: bool | None = None
    while not stop.is_set() and not member.removed:
        node = member.node
        started = time.monotonic()
        try:
            hb = await asyncio.to_thread(observe, node, pcfg.ae_title, pcfg.timeout_s)
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


async def main(cfg: Config) -> None:
    async with running_service("probe", cfg) as svc:
        up_gauge = Gauge("switchyard_probe_node_up", "1 when the node answered REST and C-ECHO", ["node"],
                         registry=svc.registry)
        beats = Counter("switchyard_probe_heartbeats", "Heartbeats published", ["node"], registry=svc.registry)
        # Nodes come from the log (config seeds them): nodes added at run time are watched too.
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        tasks: dict[str, asyncio.Task] = {}

        def ensure_watch(member: membership.Member, _event=None) -> None:
            task = tasks.get(member.node.id)
            if not member.removed and (task is None or task.done()):
                tasks[member.node.id] = asyncio.create_task(watch(cfg, member, svc.bus, up_gauge, beats, svc.stop),
                                                              name=f"watch-{member.node.id}")

        for member in pool.active():
            ensure_watch(member)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, ensure_watch))
        svc.serve_metrics(cfg.probe.metrics_port)
        log.info("watching nodes %s every %.1fs", ", ".join(m.node.id for m in pool.active()), cfg.probe.interval_s)
        # Watches end by themselves when their node is removed; the follower must not end.
        await run_until_stopped(svc.stop, [follower])
        await asyncio.gather(*tasks.values(), return_exceptions=True)
