"""Forwarder: deliver each placed instance to its node.

One durable pull consumer per node (a dead node's backlog never blocks the
others); many forwarder processes bind to the same consumers and share the
work. A message is acked only after the forwarded (or dead-lettered) event is
recorded, so a crash means redelivery, never loss. Retries go through
JetStream redelivery with backoff (nak with delay).

Membership comes from the log (shared.membership): a worker starts for every
node added at run time. While the log says a node is down or removed, its
worker no longer tries it: every placed message it fetches is closed with a
permanent ``forward_failed`` and a ``dead_lettered`` whose reason starts with
"node " and carries the placement's attempt, and the scheduler places the
instance again elsewhere. Each worker keeps a pool of
``forwarder.concurrency_per_node`` associations (one C-STORE at a time each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import nats.errors
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.forwarder.sender import NodeSender, Outcome
from shared import events as ev
from shared.blobs import BlobNotFound, BlobStore, BlobStoreError, open_blob_store
from shared.bus import Bus, BusUnavailable, PublishUncertain, forwarder_consumer
from shared import membership
from shared.config import Config, NodeConfig
from shared.dicomfile import NotDicom
from shared.runtime import run_until_stopped, running_service, wait_or_stop
from shared.telemetry import context_from

log = logging.getLogger("switchyard.forwarder")


class ForwarderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.forwarded = Counter("switchyard_forwarder_forwarded", "Instances delivered", ["node"],
                                 registry=registry)
        self.bytes = Counter("switchyard_forwarder_bytes", "Bytes delivered", ["node"], registry=registry)
        self.failures = Counter("switchyard_forwarder_failures", "Failed delivery attempts",
                                ["node", "permanent"], registry=registry)
        self.dead = Counter("switchyard_forwarder_dead_lettered", "Instances dead-lettered", ["node"],
                            registry=registry)
        self.latency = Histogram("switchyard_forwarder_store_seconds", "C-STORE time per instance",
                                 ["node"], registry=registry)
        self.inflight = Gauge("switchyard_forwarder_inflight", "Instances being delivered", ["node"],
                              registry=registry)
        self.backlog = Gauge("switchyard_forwarder_backlog", "Placed instances not yet delivered",
                             ["node"], registry=registry)


class NodeWorker:
    def __init__(self, cfg: Config, member: membership.Member, bus: Bus, blobs: BlobStore,
                 metrics: ForwarderMetrics, tr) -> None:
        self.cfg = cfg
        self.member = member
        self.node = member.node
        self.bus = bus
        self.blobs = blobs
        self.metrics = metrics
        self.tracer = tr
        self.senders: asyncio.Queue[NodeSender] = asyncio.Queue()
        self.all_senders: list[NodeSender] = []
        self._make_senders()
        self.scratch = Path(cfg.forwarder.scratch_dir)

    def _make_senders(self) -> None:
        self.senders = asyncio.Queue()
        self.all_senders = [NodeSender(self.node, self.cfg.forwarder.ae_title, self.cfg.forwarder.network_timeout_s)
                            for _ in range(max(1, self.cfg.forwarder.concurrency_per_node))]
        for sender in self.all_senders:
            self.senders.put_nowait(sender)

    @property
    def gone(self) -> bool:
        """The log says the node is down or removed: stop trying it, hand its work back."""
        return self.member.down or self.member.removed

    async def run(self, stop: asyncio.Event) -> None:
        fcfg = self.cfg.forwarder
        psub = await self.bus.pull(forwarder_consumer(self.node.id, fcfg.max_deliver, fcfg.ack_wait_s))
        try:
            while not stop.is_set():
                if self.member.node != self.node:
                    # Re-added with another address: new associations.
                    self.node = self.member.node
                    old = self.all_senders
                    self._make_senders()
                    for sender in old:
                        await sender.close()
                try:
                    msgs = await psub.fetch(fcfg.batch, timeout=1.0)
                except TimeoutError:  # nats-py raises its own or asyncio's, by code path
                    self.metrics.backlog.labels(node=self.node.id).set(0)
                    continue
                except nats.errors.Error as exc:
                    log.warning("%s: fetch failed: %s", self.node.id, exc)
                    await asyncio.sleep(0.5)
                    continue
                await asyncio.gather(*(self._handle_guarded(msg) for msg in msgs))
                if len(msgs) < fcfg.batch and fcfg.fetch_linger_s > 0:
                    # A trickle: let a few placements gather before the next pull request
                    # (each fetch costs round trips here and in nats-server).
                    await wait_or_stop(stop, fcfg.fetch_linger_s)
                with contextlib.suppress(Exception):
                    self.metrics.backlog.labels(node=self.node.id).set(
                        msgs[-1].metadata.num_pending + len(msgs))
        finally:
            with contextlib.suppress(nats.errors.Error):
                await psub.unsubscribe()
            for sender in self.all_senders:
                await sender.close()

    async def _handle_guarded(self, msg) -> None:
        try:
            await self.handle(msg)
        except Exception:  # noqa: BLE001 - one message must never stop a node's worker
            # Unacked: JetStream redelivers it after ack_wait.
            log.exception("%s: unexpected failure handling a placement", self.node.id)

    def _fetch(self, key: str) -> Path:
        """A blob the store holds elsewhere (S3) to a scratch file (blocking: on a thread)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.scratch, suffix=".dcm")
        os.close(fd)
        try:
            self.blobs.get_file(key, Path(name))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    async def _deliver(self, placed: ev.InstancePlacedV1, sender: NodeSender) -> tuple[Outcome, int]:
        """Blob to a file (local stores already have one), file to the node."""
        path = self.blobs.local_path(placed.blob_key)
        tmp: Path | None = None
        try:
            if path is None:
                tmp = path = await asyncio.to_thread(self._fetch, placed.blob_key)
            size = path.stat().st_size
            outcome = await sender.send(path, placed.sop_class_uid, placed.sop_instance_uid,
                                        placed.transfer_syntax_uid)
            return outcome, size
        except NotDicom:
            return Outcome(False, True, "blob is not a DICOM file"), 0
        except BlobNotFound:
            return Outcome(False, True, "blob missing from the object store"), 0
        except BlobStoreError as exc:
            return Outcome(False, False, f"object store unavailable ({exc})"), 0
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    async def handle(self, msg) -> None:
        placed = await self.bus.accept(msg)  # undecodable or forged: terminated
        if placed is None:
            return
        if not isinstance(placed, ev.InstancePlacedV1):
            await msg.ack()
            return
        delivery = msg.metadata.num_delivered
        node = self.node.id
        # Hand back what was placed before the node went down or left; a placement
        # recorded after that state event means the scheduler saw the node back.
        if self.gone and msg.metadata.sequence.stream < self.member.last_seq:
            state = "removed" if self.member.removed else "down"
            try:
                await self._failed(msg, placed, Outcome(False, True, f"node {state}"), delivery)
            except (BusUnavailable, PublishUncertain) as exc:
                log.warning("%s: hand-back of %s not recorded (%s)", node, placed.sop_instance_uid, exc)
            return
        parent = context_from(placed.traceparent, placed.tracestate)
        with self.tracer.start_as_current_span("forwarder.c_store", context=parent) as span:
            span.set_attribute("dicom.sop_instance_uid", placed.sop_instance_uid)
            span.set_attribute("switchyard.node", node)
            span.set_attribute("switchyard.delivery", delivery)
            sender = await self.senders.get()
            self.metrics.inflight.labels(node=node).inc()
            started = time.perf_counter()
            try:
                outcome, size = await self._deliver(placed, sender)
            finally:
                self.metrics.inflight.labels(node=node).dec()
                self.senders.put_nowait(sender)
            elapsed = time.perf_counter() - started
            span.set_attribute("switchyard.outcome", outcome.reason)
        try:
            if outcome.ok:
                await self.bus.publish(ev.InstanceForwardedV1(
                    event_id=ev.fact_id("forwarded", placed.event_id),
                    sop_instance_uid=placed.sop_instance_uid, study_instance_uid=placed.study_instance_uid,
                    node_id=node, placement_id=placed.event_id, duration_ms=round(elapsed * 1000, 3),
                    status=outcome.status or 0,
                ))
                self.metrics.forwarded.labels(node=node).inc()
                self.metrics.bytes.labels(node=node).inc(size)
                self.metrics.latency.labels(node=node).observe(elapsed)
                await msg.ack()
                return
            await self._failed(msg, placed, outcome, delivery)
        except (BusUnavailable, PublishUncertain) as exc:
            # Leave the message unacked: it is redelivered and the ids dedupe.
            log.warning("%s: outcome of %s not recorded (%s)", node, placed.sop_instance_uid, exc)

    async def _failed(self, msg, placed: ev.InstancePlacedV1, outcome: Outcome, delivery: int) -> None:
        node = self.node.id
        last = outcome.permanent or delivery >= self.cfg.forwarder.max_deliver
        self.metrics.failures.labels(node=node, permanent=str(outcome.permanent).lower()).inc()
        log.warning("%s: delivery %d of %s failed: %s%s", node, delivery, placed.sop_instance_uid,
                    outcome.reason, " (final)" if last else "")
        await self.bus.publish(ev.InstanceForwardFailedV1(
            event_id=ev.fact_id("forward_failed", placed.event_id, delivery),
            sop_instance_uid=placed.sop_instance_uid, study_instance_uid=placed.study_instance_uid,
            node_id=node, placement_id=placed.event_id, reason=outcome.reason,
            permanent=outcome.permanent, delivery=delivery, status=outcome.status,
        ))
        if not last:
            backoff = self.cfg.forwarder.retry_backoff_s
            await msg.nak(delay=backoff[min(delivery, len(backoff)) - 1] if backoff else 1.0)
            return
        await self.bus.publish(ev.InstanceDeadLetteredV1(
            event_id=ev.fact_id("dead_lettered", placed.event_id),
            sop_instance_uid=placed.sop_instance_uid, study_instance_uid=placed.study_instance_uid,
            node_id=node, placement_id=placed.event_id,
            reason=outcome.reason if outcome.reason in ("node down", "node removed") else
            f"{outcome.reason} after {delivery} deliveries",
            received_seq=placed.received_seq, attempt=placed.attempt, avoid=placed.avoid, pool=placed.pool,
        ))
        self.metrics.dead.labels(node=node).inc()
        await msg.term()


async def main(cfg: Config) -> None:
    async with running_service("forwarder", cfg) as svc:
        blobs = open_blob_store(cfg.blobs)
        metrics = ForwarderMetrics(svc.registry)
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        tasks: dict[str, asyncio.Task] = {}

        def ensure_worker(member: membership.Member) -> None:
            # A removed node keeps its worker: it hands the node's backlog back.
            if member.node.id not in tasks:
                worker = NodeWorker(cfg, member, svc.bus, blobs, metrics, svc.tracer)
                tasks[member.node.id] = asyncio.create_task(worker.run(svc.stop), name=f"forward-{member.node.id}")
                log.info("forwarding to node %s", member.node.id)

        for member in pool.members.values():
            ensure_worker(member)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, lambda m, _e: ensure_worker(m)))
        svc.serve_metrics(cfg.forwarder.metrics_port)
        # A worker that dies, or the membership follower, stops the process loudly.
        await run_until_stopped(svc.stop, [follower, *tasks.values()])
        await asyncio.gather(*tasks.values(), return_exceptions=True)
