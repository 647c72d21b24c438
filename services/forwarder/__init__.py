"""Forwarder: deliver each placed instance to its node.

One worker per node (``worker.NodeWorker``), each on its own durable pull
consumer, so a dead node's backlog never blocks the others; many forwarder
processes bind to the same consumers and share the work. Membership comes from
the log (shared.membership): a worker starts for every node added at run time,
and a removed node keeps its worker, which hands the node's backlog back.
"""

from __future__ import annotations

import asyncio
import logging

from services.forwarder.worker import ForwarderMetrics, NodeWorker
from shared import membership
from shared.blobs import open_blob_store
from shared.config import Config
from shared.runtime import run_until_stopped, running_service

log = logging.getLogger("switchyard.forwarder")


async def main(cfg: Config) -> None:
    async with running_service("forwarder", cfg) as svc:
        blobs = open_blob_store(cfg.blobs)
        metrics = ForwarderMetrics(svc.registry)
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        tasks: dict[str, asyncio.Task] = {}
        workers: dict[str, NodeWorker] = {}

        def ensure_worker(member: membership.Member) -> None:
            # A removed node keeps its worker: it hands the node's backlog back.
            if member.node.id not in tasks:
                worker = workers[member.node.id] = NodeWorker(cfg, member, svc.bus, blobs, metrics, svc.tracer)
                tasks[member.node.id] = asyncio.create_task(worker.run(svc.stop), name=f"forward-{member.node.id}")
                log.info("forwarding to node %s", member.node.id)

        async def changed(member: membership.Member, _event) -> None:
            ensure_worker(member)
            # Down or removed: its idle associations closed now, held messages re-decided.
            await workers[member.node.id].membership_changed()

        for member in pool.members.values():
            ensure_worker(member)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, changed))
        svc.serve_metrics(cfg.forwarder.metrics_port, consumers=lambda: len(tasks))  # one durable per node
        # A worker that dies, or the membership follower, stops the process loudly.
        await run_until_stopped(svc.stop, [follower, *tasks.values()])
        await asyncio.gather(*tasks.values(), return_exceptions=True)
