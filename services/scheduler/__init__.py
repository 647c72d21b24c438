"""Scheduler: received instances in, one placement decision each out.

Node liveness comes from the probe's heartbeats (core NATS subscription on the
heartbeat subjects: live telemetry, no replay needed). Study affinity is
rebuilt at start by replaying every placed event, so it survives restarts.
Placement ids are deterministic (received stream sequence + attempt), so a
redelivered received message after a crash cannot be placed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import nats.errors
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.scheduler.policy import NodeView, Weights, place
from shared import events as ev
from shared.bus import SUBJECT_HEARTBEAT_ALL, SUBJECT_PLACED_ALL, Bus, BusUnavailable, PublishUncertain, scheduler_consumer
from shared.config import Config, SchedulerConfig
from shared.runtime import running_service
from shared.telemetry import context_from, current_trace_context

log = logging.getLogger("switchyard.scheduler")


def weights_from(cfg: SchedulerConfig) -> Weights:
    return Weights(
        pending_jobs=cfg.weight_pending_jobs, inflight=cfg.weight_inflight, cpu=cfg.weight_cpu,
        instances=cfg.weight_instances, rtt_ms=cfg.weight_rtt_ms, disk_free_gb=cfg.weight_disk_free_gb,
    )


class Membership:
    """The live view of nodes: last heartbeat, reservations since it, drained flag."""

    def __init__(self, node_ids: list[str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.heartbeats: dict[str, tuple[float, ev.NodeHeartbeatV1]] = {}
        self.reserved: dict[str, int] = {n: 0 for n in node_ids}
        self.drained: set[str] = set()
        self.known = list(node_ids)

    def heartbeat(self, hb: ev.NodeHeartbeatV1, now: float) -> None:
        if hb.node_id not in self.reserved:
            return
        self.heartbeats[hb.node_id] = (now, hb)
        self.reserved[hb.node_id] = 0

    def reserve(self, node_id: str) -> None:
        self.reserved[node_id] += 1

    def views(self, now: float) -> list[NodeView]:
        out = []
        for node_id in self.known:
            seen = self.heartbeats.get(node_id)
            if seen is None:
                out.append(NodeView(node_id, live=False))
                continue
            at, hb = seen
            out.append(NodeView(
                node_id, live=hb.up and now - at <= self.timeout_s, drained=node_id in self.drained,
                pending_jobs=hb.pending_jobs, instance_count=hb.instance_count,
                disk_free_bytes=hb.disk_free_bytes, cpu_percent=hb.cpu_percent, rtt_ms=hb.rtt_ms,
                reserved=self.reserved[node_id],
            ))
        return out


class Scheduler:
    def __init__(self, cfg: Config, bus: Bus, registry: CollectorRegistry, tr) -> None:
        self.cfg = cfg
        self.bus = bus
        self.tracer = tr
        self.weights = weights_from(cfg.scheduler)
        self.members = Membership([n.id for n in cfg.nodes], cfg.scheduler.heartbeat_timeout_s)
        self.affinity: dict[str, str] = {}
        self.hb_decoder = msgspec.json.Decoder(ev.NodeHeartbeatV1)
        self.placements = Counter("switchyard_scheduler_placements", "Placement decisions",
                                  ["node", "reason"], registry=registry)
        self.waiting = Counter("switchyard_scheduler_no_live_node", "Instances that found no live node",
                               registry=registry)
        self.decision_seconds = Histogram("switchyard_scheduler_decision_seconds", "Decision time",
                                          registry=registry)
        self.live_nodes = Gauge("switchyard_scheduler_live_nodes", "Nodes eligible for new work",
                                registry=registry)
        self.node_live = Gauge("switchyard_scheduler_node_live", "1 when the node may get new work",
                               ["node"], registry=registry)

    async def rebuild_affinity(self) -> None:
        count = 0
        async for d in self.bus.replay(SUBJECT_PLACED_ALL):
            if isinstance(d.event, ev.InstancePlacedV1):
                self.affinity[d.event.study_instance_uid] = d.event.node_id
                count += 1
        log.info("affinity rebuilt from %d placements (%d studies)", count, len(self.affinity))

    async def on_heartbeat(self, msg) -> None:
        try:
            hb = self.hb_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable heartbeat on %s", msg.subject)
            return
        self.members.heartbeat(hb, time.monotonic())
        for view in self.members.views(time.monotonic()):
            self.node_live.labels(node=view.node_id).set(1 if view.eligible else 0)

    async def decide(self, seq: int, received: ev.InstanceReceivedV1) -> ev.InstancePlacedV1 | None:
        study = received.study_instance_uid
        views = self.members.views(time.monotonic())
        self.live_nodes.set(sum(v.eligible for v in views))
        decision = place(study, views, self.affinity.get(study), self.weights)
        if decision is None:
            return None
        traceparent, tracestate = current_trace_context()
        return ev.InstancePlacedV1(
            event_id=ev.fact_id("placed", received.sop_instance_uid, seq, 0),
            traceparent=traceparent, tracestate=tracestate,
            sop_instance_uid=received.sop_instance_uid, study_instance_uid=study,
            sop_class_uid=received.sop_class_uid, transfer_syntax_uid=received.transfer_syntax_uid,
            blob_key=received.blob_key, dataset_digest=received.dataset_digest,
            node_id=decision.node_id, reason=decision.reason,
            candidates=[ev.Candidate(n, round(s, 6)) for n, s in decision.candidates],
            attempt=0, received_seq=seq,
        )

    async def run(self, stop: asyncio.Event) -> None:
        psub = await self.bus.pull(scheduler_consumer())
        try:
            while not stop.is_set():
                try:
                    msgs = await psub.fetch(64, timeout=1.0)
                except TimeoutError:  # nats-py raises its own or asyncio's, by code path
                    continue
                except nats.errors.Error as exc:
                    log.warning("fetch failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self.handle(msg)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await psub.unsubscribe()

    async def handle(self, msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            received = ev.decode(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable event at seq %d; terminated", seq)
            await msg.term()
            return
        if not isinstance(received, ev.InstanceReceivedV1):
            await msg.ack()
            return
        parent = context_from(received.traceparent, received.tracestate)
        with self.tracer.start_as_current_span("scheduler.place", context=parent) as span:
            span.set_attribute("dicom.sop_instance_uid", received.sop_instance_uid)
            started = time.perf_counter()
            placed = await self.decide(seq, received)
            self.decision_seconds.observe(time.perf_counter() - started)
            if placed is None:
                self.waiting.inc()
                log.warning("no live node for %s; retrying in %.1fs", received.sop_instance_uid,
                            self.cfg.scheduler.no_node_retry_s)
                await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
                return
            span.set_attribute("switchyard.node", placed.node_id)
            span.set_attribute("switchyard.reason", placed.reason)
            try:
                await self.bus.publish(placed)
            except (BusUnavailable, PublishUncertain) as exc:
                # Not acked: JetStream redelivers, and the same placement id dedupes.
                log.warning("placement of %s not recorded (%s); will retry", received.sop_instance_uid, exc)
                return
            self.affinity[placed.study_instance_uid] = placed.node_id
            self.members.reserve(placed.node_id)
            self.placements.labels(node=placed.node_id, reason=placed.reason).inc()
            await msg.ack()


async def main(cfg: Config) -> None:
    async with running_service("scheduler", cfg) as svc:
        scheduler = Scheduler(cfg, svc.bus, svc.registry, svc.tracer)
        await scheduler.rebuild_affinity()
        await svc.bus.nc.subscribe(SUBJECT_HEARTBEAT_ALL, cb=scheduler.on_heartbeat)
        svc.serve_metrics(cfg.scheduler.metrics_port)
        log.info("scheduling for nodes %s", ", ".join(n.id for n in cfg.nodes))
        await scheduler.run(svc.stop)
