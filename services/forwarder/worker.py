"""The per-node worker: pull a node's placements, deliver them, record the outcome.

Owns one node's durable pull consumer (``forwarder-<node>``) and its pool of
``forwarder.concurrency_per_node`` associations (one C-STORE at a time each).
A message is acked only after the ``forwarded`` (or ``dead_lettered``) event
is recorded, so a crash means redelivery, never loss; retries go through
JetStream redelivery with backoff (nak with delay). While the log says the
node is down or removed, every placement recorded before that state event is
handed back: a permanent ``forward_failed`` and a ``dead_lettered`` whose
reason is ``node down`` / ``node removed`` (``events.FailureReason``), which
the scheduler places again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.forwarder.sender import NodeSender, Outcome
from shared import events as ev
from shared import membership
from shared.blobs import BlobNotFound, BlobStore, BlobStoreError
from shared.bus import Bus, BusUnavailable, PublishUncertain, forwarder_consumer
from shared.config import Config
from shared.dicomfile import NotDicom
from shared.telemetry import context_from

log = logging.getLogger("switchyard.forwarder")


class ForwarderMetrics:
    """Per-node delivery metrics, shared by every worker of the process."""

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
    """One node's delivery loop: its consumer, its associations, its outcome events."""

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
        consumer = forwarder_consumer(self.node.id, fcfg.max_deliver, fcfg.ack_wait_s)
        try:
            async with contextlib.aclosing(
                    self.bus.pull_batches(consumer, fcfg.batch, stop, linger=fcfg.fetch_linger_s)) as batches:
                async for msgs in batches:
                    if self.member.node != self.node:
                        # Re-added with another address: new associations.
                        self.node = self.member.node
                        old = self.all_senders
                        self._make_senders()
                        for sender in old:
                            await sender.close()
                    if not msgs:
                        self.metrics.backlog.labels(node=self.node.id).set(0)
                        continue
                    await asyncio.gather(*(self._handle_guarded(msg) for msg in msgs))
                    with contextlib.suppress(Exception):
                        self.metrics.backlog.labels(node=self.node.id).set(
                            msgs[-1].metadata.num_pending + len(msgs))
        finally:
            for sender in self.all_senders:
                await sender.close()

    async def _handle_guarded(self, msg) -> None:
        try:
            await self.handle(msg)
        except Exception:  # noqa: BLE001 - one message must never stop a node's worker
            # Unacked: JetStream redelivers it after ack_wait.
            log.exception("%s: unexpected failure handling a placement", self.node.id)

    async def _deliver(self, placed: ev.InstancePlacedV1, sender: NodeSender) -> tuple[Outcome, int]:
        """Blob to a file (local stores already have one), file to the node."""
        path = self.blobs.local_path(placed.blob_key)
        tmp: Path | None = None
        try:
            if path is None:
                tmp = path = await asyncio.to_thread(self.blobs.to_scratch_file, placed.blob_key, self.scratch)
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
            gone = ev.FailureReason.NODE_REMOVED if self.member.removed else ev.FailureReason.NODE_DOWN
            try:
                await self._failed(msg, placed, Outcome(False, True, gone), delivery)
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
            reason=outcome.reason if outcome.reason in ev.NODE_GONE_REASONS else
            f"{outcome.reason} after {delivery} deliveries",
            received_seq=placed.received_seq, attempt=placed.attempt, avoid=placed.avoid, pool=placed.pool,
        ))
        self.metrics.dead.labels(node=node).inc()
        await msg.term()
