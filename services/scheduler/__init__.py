"""Scheduler: received instances in, one placement decision each out.

Reads top-down: ``scheduler`` (the decision loop and re-placement),
``liveness`` (heartbeats -> node up/down events), ``affinity`` (study ->
node KV), ``policy`` (the pure scoring and choice), ``routing`` (rules ->
pools). Membership (which nodes exist, drained, removed, down) is folded from
the node.state events in the log and followed live (shared.membership).
"""

from __future__ import annotations

import asyncio
import logging

from services.scheduler.affinity import affinity_bucket
from services.scheduler.scheduler import Scheduler
from shared import membership
from shared.bus import SUBJECT_HEARTBEAT_ALL
from shared.config import Config
from shared.runtime import running_service

log = logging.getLogger("switchyard.scheduler")


async def main(cfg: Config) -> None:
    async with running_service("scheduler", cfg) as svc:
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        kv = await affinity_bucket(svc.bus, cfg)
        scheduler = Scheduler(cfg, svc.bus, svc.registry, svc.tracer, pool, kv)
        await svc.bus.nc.subscribe(SUBJECT_HEARTBEAT_ALL, cb=scheduler.watch.on_heartbeat)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, scheduler.on_state))
        svc.serve_metrics(cfg.scheduler.metrics_port, consumers=3)  # received, dead letters, verify failures
        log.info("scheduling for nodes %s", ", ".join(m.node.id for m in pool.active()))
        try:
            await scheduler.run(svc.stop)
        finally:
            await follower
