"""The probe's first job: watch each Orthanc node and publish its heartbeat.

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

from services.probe.health import enrich
from shared import events as ev
from shared import membership, ul
from shared.bus import Bus, BusUnavailable, PublishUncertain
from shared.config import Config, NodeConfig
from shared.orthanc import OrthancClient, OrthancError
from shared.runtime import wait_or_stop

log = logging.getLogger("switchyard.probe.watch")


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


async def observe(
    node: NodeConfig, calling_ae: str, timeout: float, client: OrthancClient | None = None
) -> ev.NodeHeartbeatV1:
    """One look at one node: REST on a worker thread (http.client blocks), C-ECHO on the loop.

    ``client``: the watch's own, so its keep-alive connection serves every look.
    """
    now = ev.utcnow()
    event_id = ev.fact_id("heartbeat", node.id, now.isoformat())
    client = client or OrthancClient(node, timeout)
    try:
        stats, pending = await asyncio.to_thread(_load, client)
    except (OrthancError, ValueError, KeyError) as exc:
        return ev.NodeHeartbeatV1(event_id=event_id, occurred_at=now, node_id=node.id, up=False, error=f"REST: {exc}")
    rtt = await echo_rtt_ms(node, calling_ae, timeout)
    extra = await asyncio.to_thread(enrich, client)
    return ev.NodeHeartbeatV1(
        event_id=event_id,
        occurred_at=now,
        node_id=node.id,
        up=rtt is not None,
        error="" if rtt is not None else "C-ECHO failed",
        pending_jobs=pending,
        instance_count=int(stats.get("CountInstances", 0)),
        disk_used_bytes=int(stats.get("TotalDiskSize", 0)),
        rtt_ms=None if rtt is None else round(rtt, 3),
        **extra,
    )


async def watch(
    cfg: Config, member: membership.Member, bus: Bus, up_gauge: Gauge, beats: Counter, stop: asyncio.Event
) -> None:
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
            hb = ev.NodeHeartbeatV1(
                event_id=ev.fact_id("heartbeat", node.id, ev.utcnow().isoformat()),
                node_id=node.id,
                up=False,
                error=f"probe: {type(exc).__name__}",
            )
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
