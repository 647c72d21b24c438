"""The per-node worker: pull a node's placements, deliver them, record the outcome.

Owns one node's durable pull consumer (``forwarder-<node>``) and its pool of
``forwarder.concurrency_per_node`` associations (one C-STORE at a time each).
Each fetched placement is its own task, acked as it finishes: one slow or
poison instance holds one association, never the batch. A message is acked
only after the ``forwarded`` (or ``dead_lettered``) event is recorded, so a
crash means redelivery, never loss.

Failures are classified (``sender.Outcome``): the node failing (unreachable,
association rejected) pauses the whole worker with backoff and uses up no
delivery; the node rejecting or aborting on this dataset dead-letters it after
``INSTANCE_TRIES`` deliveries; anything else (0xA7xx, a response timeout, the
object store) retries through JetStream redelivery with backoff.

Delivery is idempotent against the node: before a placement that may have been
sent already (a redelivery) is handed back or dead-lettered, the worker asks
whether it already landed (the placement ids it recorded itself, then the
node's REST ``/tools/lookup``); if so it is settled as ``forwarded`` with
``already_present``. A node that cannot be asked is never assumed not to hold
it: the message is held (kept in progress) until the node answers or is
removed. While the log says the node is down or removed, every placement
recorded before that state event is handed back: a ``forward_failed`` and a
``dead_lettered`` with reason ``node down`` / ``node removed`` and
``counts_as_attempt=False``, which the scheduler places again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.forwarder.sender import NodeSender, Outcome
from shared import events as ev
from shared import membership, telemetry
from shared.blobs import BlobNotFound, BlobStore, BlobStoreError
from shared.bus import Bus, BusUnavailable, PublishUncertain, forwarder_consumer
from shared.config import Config
from shared.dicomfile import NotDicom
from shared.metrics import ReasonLabel, Stage, observe, reason_counter, reason_label, seconds_since, stage_histogram
from shared.orthanc import OrthancClient, OrthancError
from shared.telemetry import context_from

log = logging.getLogger("switchyard.forwarder.worker")

# Deliveries of an instance the node rejects or aborts on before it is dead-lettered.
INSTANCE_TRIES = 2
# Pause of a node's worker after consecutive node failures (seconds), the last repeating.
NODE_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# How often a held message asks the node again (and tells JetStream it is in progress).
HOLD_POLL_S = 2.0
# Held messages beyond this many count as work in flight again (max_ack_pending is 256).
MAX_HELD = 128
# Placement ids whose ``forwarded`` this process recorded (a lost ack is settled without the node).
RECORDED_MAX = 100_000


class ForwarderMetrics:
    """Per-node delivery metrics, shared by every worker of the process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.forwarded = Counter("switchyard_forwarder_forwarded", "Instances delivered", ["node"], registry=registry)
        self.bytes = Counter("switchyard_forwarder_bytes", "Bytes delivered", ["node"], registry=registry)
        self.failures = Counter(
            "switchyard_forwarder_failures", "Failed delivery attempts", ["node", "permanent"], registry=registry
        )
        self.dead = Counter(
            "switchyard_forwarder_dead_lettered", "Instances dead-lettered", ["node"], registry=registry
        )
        self.latency = Histogram(
            "switchyard_forwarder_store_seconds", "C-STORE time per instance", ["node"], registry=registry
        )
        self.inflight = Gauge("switchyard_forwarder_inflight", "Instances being delivered", ["node"], registry=registry)
        self.backlog = Gauge(
            "switchyard_forwarder_backlog", "Placed instances not yet delivered", ["node"], registry=registry
        )
        self.already_present = Counter(
            "switchyard_forwarder_already_present",
            "Redelivered placements found already on their node",
            ["node"],
            registry=registry,
        )
        self.node_failures = Counter(
            "switchyard_forwarder_node_failures",
            "Deliveries that found the node itself failing (worker paused)",
            ["node"],
            registry=registry,
        )
        self.stage = stage_histogram(registry)
        self.dead_by_reason = reason_counter(
            "switchyard_dead_letters", "Instances dead-lettered, by node and reason", (), registry
        )
        self.blob_errors = Counter(
            "switchyard_forwarder_blob_errors", "Blob store reads that failed (delivery retried)", registry=registry
        )
        self.held = Gauge(
            "switchyard_forwarder_held", "Placements held until their node can be asked", ["node"], registry=registry
        )

    def node_added(self, node: str) -> None:
        """The node's series at 0 from the start: its dashboard and rates show data before its first instance."""
        for per_node in (self.forwarded, self.bytes, self.dead, self.latency, self.inflight, self.backlog):
            per_node.labels(node=node)
        for per_node in (self.already_present, self.node_failures, self.held):
            per_node.labels(node=node)


# The forwarder's INFO line per node: at most one per this many seconds.
SUMMARY_S = 10.0


class DeliverySummary:
    """``node2 (NODE2): 57 instances forwarded in 10.0s`` at INFO, at most once per ``every`` seconds.

    The first delivery after a quiet spell is logged at once; the rest of a busy spell is
    counted and logged when the period is up (by a timer, so the tail is not lost when
    traffic stops). Node and counts only: no UIDs, no patient values.
    """

    def __init__(self, node: str, every: float = SUMMARY_S) -> None:
        self.node, self.every = node, every
        self.pending = 0
        self.since = 0.0
        self.logged_at = -every
        self.timer: asyncio.TimerHandle | None = None

    def forwarded(self) -> None:
        now = time.monotonic()
        if not self.pending:
            self.since = now
        self.pending += 1
        if now - self.logged_at >= self.every:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.every - (now - self.logged_at), self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        now = time.monotonic()
        n = self.pending
        log.info("%s: %d instance%s forwarded in %.1fs", self.node, n, "" if n == 1 else "s", now - self.since)
        self.pending, self.logged_at = 0, now


class NodeWorker:
    """One node's delivery loop: its consumer, its associations, its outcome events."""

    def __init__(
        self, cfg: Config, member: membership.Member, bus: Bus, blobs: BlobStore, metrics: ForwarderMetrics, tr
    ) -> None:
        self.cfg = cfg
        self.member = member
        self.node = member.node
        self.bus = bus
        self.blobs = blobs
        self.metrics = metrics
        for label in ReasonLabel:  # every (node, reason) at 0: alerts and panels have data from the start
            metrics.dead_by_reason.labels(self.node.id, label.value)
        for permanent in ("true", "false"):
            metrics.failures.labels(node=self.node.id, permanent=permanent)
        metrics.stage.labels(Stage.PLACED_TO_FORWARDED, self.node.id)
        metrics.forwarded.labels(node=self.node.id)
        metrics.bytes.labels(node=self.node.id)
        self.tracer = tr
        self.senders: asyncio.Queue[NodeSender] = asyncio.Queue()
        self.all_senders: list[NodeSender] = []
        self._make_senders()
        self.scratch = Path(cfg.forwarder.scratch_dir)
        self.recorded: OrderedDict[str, None] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()
        # Tasks holding a message until the node can be asked: not counted as work in flight.
        self.holding = 0
        # Tasks only waiting (held, or for a paused node): nothing to finish on the way out.
        self.waiting: set[asyncio.Task] = set()
        self.tasks_closing: set[asyncio.Task] = set()
        # Node-failure pause: no C-STORE (and no fetch) before this monotonic time.
        self.paused_until = 0.0
        self.node_failures = 0
        # Set on every membership change of this node: wakes held and paused messages.
        self.changed = asyncio.Event()
        self._client: OrthancClient | None = None
        metrics.node_added(self.node.id)
        self.summary = DeliverySummary(f"{self.node.id} ({self.node.ae_title})")

    def _make_senders(self) -> None:
        self.senders = asyncio.Queue()
        self.all_senders = [
            NodeSender(self.node, self.cfg.forwarder.ae_title, self.cfg.forwarder.network_timeout_s)
            for _ in range(max(1, self.cfg.forwarder.concurrency_per_node))
        ]
        for sender in self.all_senders:
            self.senders.put_nowait(sender)

    @property
    def gone(self) -> bool:
        """The log says the node is down or removed: stop trying it, hand its work back."""
        return self.member.down or self.member.removed

    async def membership_changed(self) -> None:
        """The log changed this node's state: wake waiting messages; a node now down or
        removed gets its idle associations closed at once (so it can shut down)."""
        self.changed.set()
        self.changed = asyncio.Event()
        if self.gone:
            # In the background: releasing an association to a dead node waits for its timeout,
            # and the membership follower must not.
            closing = asyncio.create_task(self._close_idle())
            self.tasks_closing.add(closing)
            closing.add_done_callback(self.tasks_closing.discard)

    async def _close_idle(self) -> None:
        await asyncio.gather(*(sender.close_if_idle() for sender in self.all_senders))

    # -- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        fcfg = self.cfg.forwarder
        consumer = forwarder_consumer(self.node.id, fcfg.max_deliver, fcfg.ack_wait_s)
        batch = max(1, fcfg.batch)
        try:
            async with contextlib.aclosing(
                self.bus.pull_batches(consumer, batch, stop, linger=fcfg.fetch_linger_s)
            ) as batches:
                async for msgs in batches:
                    if self.member.node != self.node:
                        # Re-added with another address: new associations.
                        self.node = self.member.node
                        self._client = None
                        old = self.all_senders
                        self._make_senders()
                        for sender in old:
                            await sender.close()
                    if not msgs:
                        self.metrics.backlog.labels(node=self.node.id).set(0)
                        continue
                    for msg in msgs:
                        task = asyncio.create_task(self._handle_guarded(msg))
                        self.tasks.add(task)
                        task.add_done_callback(self.tasks.discard)
                    with contextlib.suppress(Exception):
                        self.metrics.backlog.labels(node=self.node.id).set(msgs[-1].metadata.num_pending + len(msgs))
                    # Pull more as soon as half a batch is done (never waiting for the slowest),
                    # and nothing while the node is failing.
                    await self._room(batch // 2, stop)
        finally:
            await self._drain()
            self.summary.flush()
            for sender in self.all_senders:
                await sender.close()

    async def _room(self, limit: int, stop: asyncio.Event) -> None:
        """Until at most ``limit`` messages are being worked on (held ones aside, up to
        MAX_HELD) and the node is not paused."""
        while not stop.is_set() and (len(self.tasks) - min(self.holding, MAX_HELD) > limit or self._paused()):
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
            if self.tasks:
                waits.append(asyncio.ensure_future(asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)))
            # Re-checked at least every HOLD_POLL_S: a task that starts holding completes nothing.
            timeout = max(0.05, self.paused_until - time.monotonic()) if self._paused() else HOLD_POLL_S
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def _drain(self) -> None:
        """On the way out: let C-STOREs on the wire finish briefly; the rest is redelivered."""
        deadline = time.monotonic() + 5.0
        while (working := self.tasks - self.waiting) and time.monotonic() < deadline:
            await asyncio.wait(working, timeout=min(0.5, deadline - time.monotonic()))
        pending = set(self.tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    @contextlib.contextmanager
    def _only_waiting(self):
        """Marks the current task as waiting (not delivering) while inside."""
        task = asyncio.current_task()
        if task is not None:
            self.waiting.add(task)
        try:
            yield
        finally:
            self.waiting.discard(task)  # type: ignore[arg-type]

    def _paused(self) -> bool:
        return time.monotonic() < self.paused_until

    async def _handle_guarded(self, msg) -> None:
        try:
            await self.handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one message must never stop a node's worker
            # Unacked: JetStream redelivers it after ack_wait.
            log.exception("%s: unexpected failure handling a placement", self.node.id)

    # -- one placement ----------------------------------------------------------------

    async def handle(self, msg) -> None:
        placed = await self.bus.accept(msg)  # undecodable or forged: terminated
        if placed is None:
            return
        if not isinstance(placed, ev.InstancePlacedV1):
            await msg.ack()
            return
        delivery = msg.metadata.num_delivered
        if placed.event_id in self.recorded:
            # Its outcome is on the log already; only the ack was lost.
            await msg.ack()
            return
        node_failure_recorded = False
        while True:
            # Hand back what was placed before the node went down or left; a placement
            # recorded after that state event means the scheduler saw the node back.
            if self.gone and msg.metadata.sequence.stream < self.member.last_seq:
                if await self._hand_back(msg, placed, delivery):
                    return
                continue
            if self._paused():
                await self._wait_paused(msg)
                continue
            outcome, size, elapsed, ctx = await self._attempt(placed, delivery)
            if outcome.node_failure:
                # The node, not this instance: pause the worker, keep the message, use no delivery.
                self._pause(outcome.reason)
                if not node_failure_recorded:
                    node_failure_recorded = await self._record_failure(placed, outcome, delivery, ctx)
                continue
            self.node_failures = 0
            try:
                if outcome.ok:
                    await self._settled(msg, placed, elapsed, outcome.status or 0, size=size, ctx=ctx)
                else:
                    await self._failed(msg, placed, outcome, delivery, ctx)
            except (BusUnavailable, PublishUncertain) as exc:
                # Leave the message unacked: it is redelivered and the ids dedupe.
                log.warning("%s: outcome of %s not recorded (%s)", self.node.id, placed.sop_instance_uid, exc)
            return

    async def _attempt(self, placed: ev.InstancePlacedV1, delivery: int) -> tuple[Outcome, int, float, tuple[str, str]]:
        """One C-STORE (a CLIENT span, child of the placement's); the outcome events carry its context."""
        node = self.node.id
        parent = context_from(placed.traceparent, placed.tracestate)
        with telemetry.span(self.tracer, "forwarder.c_store", context=parent, kind=SpanKind.CLIENT) as span:
            span.set_attributes(
                {
                    "rpc.system": "dicom",
                    "rpc.method": "C-STORE",
                    "dicom.sop_instance_uid": placed.sop_instance_uid,
                    "dicom.sop_class_uid": placed.sop_class_uid,
                    "dicom.transfer_syntax_uid": placed.transfer_syntax_uid,
                    "dicom.calling_ae": self.cfg.forwarder.ae_title,
                    "dicom.called_ae": self.node.ae_title,
                    "switchyard.node": node,
                    "switchyard.delivery": delivery,
                    "switchyard.attempt": placed.attempt,
                }
            )
            sender = await self.senders.get()
            self.metrics.inflight.labels(node=node).inc()
            started = time.perf_counter()
            try:
                outcome, size = await self._deliver(placed, sender)
            finally:
                self.metrics.inflight.labels(node=node).dec()
                if self.gone:
                    await sender.close()
                self.senders.put_nowait(sender)
            span.set_attribute("switchyard.outcome", outcome.reason)
            span.set_attribute("switchyard.size", size)
            if outcome.status is not None:
                telemetry.dicom_status(span, outcome.status)
            if not outcome.ok:
                telemetry.fail(span, outcome.reason)  # fixed texts: a status, an exception type, never values
            ctx = telemetry.context_of(span)
        return outcome, size, time.perf_counter() - started, ctx

    async def _deliver(self, placed: ev.InstancePlacedV1, sender: NodeSender) -> tuple[Outcome, int]:
        """Blob to a file (local stores already have one), file to the node."""
        path = self.blobs.local_path(placed.blob_key)
        tmp: Path | None = None
        try:
            if path is None:
                tmp = path = await asyncio.to_thread(self.blobs.to_scratch_file, placed.blob_key, self.scratch)
            size = path.stat().st_size
            outcome = await sender.send(path, placed.sop_class_uid, placed.sop_instance_uid, placed.transfer_syntax_uid)
            return outcome, size
        except NotDicom:
            return Outcome(False, True, "blob is not a DICOM file"), 0
        except BlobNotFound:
            return Outcome(False, True, "blob missing from the object store"), 0
        except BlobStoreError as exc:
            self.metrics.blob_errors.inc()
            return Outcome(False, False, f"object store unavailable ({exc})"), 0
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _pause(self, reason: str) -> None:
        backoff = NODE_BACKOFF_S[min(self.node_failures, len(NODE_BACKOFF_S) - 1)]
        until = time.monotonic() + backoff
        if until > self.paused_until:
            if not self._paused():
                log.warning("%s: node failing (%s); pausing its deliveries %.1fs", self.node.id, reason, backoff)
                self.node_failures += 1
            self.paused_until = until
        self.metrics.node_failures.labels(node=self.node.id).inc()

    async def _wait_paused(self, msg) -> None:
        """Wait out the node's pause (or a state change), keeping the message in progress."""
        changed = self.changed
        with self._only_waiting():
            with contextlib.suppress(Exception):
                await msg.in_progress()
            wait = min(max(0.0, self.paused_until - time.monotonic()), HOLD_POLL_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)

    # -- outcomes ---------------------------------------------------------------------

    async def _settled(
        self,
        msg,
        placed: ev.InstancePlacedV1,
        elapsed: float,
        status: int,
        size: int = 0,
        already_present: bool = False,
        ctx: tuple[str, str] | None = None,
    ) -> None:
        node = self.node.id
        traceparent, tracestate = ctx or (placed.traceparent, placed.tracestate)
        await self.bus.publish(
            ev.InstanceForwardedV1(
                event_id=ev.fact_id("forwarded", placed.event_id),
                traceparent=traceparent,
                tracestate=tracestate,
                sop_instance_uid=placed.sop_instance_uid,
                study_instance_uid=placed.study_instance_uid,
                node_id=node,
                placement_id=placed.event_id,
                duration_ms=round(elapsed * 1000, 3),
                status=status,
                already_present=already_present,
                received_at=placed.received_at,
            )
        )
        self._remember(placed.event_id)
        if already_present:
            self.metrics.already_present.labels(node=node).inc()
            log.info("%s: %s already on the node; settled as delivered", node, placed.sop_instance_uid)
        else:
            self.metrics.forwarded.labels(node=node).inc()
            self.metrics.bytes.labels(node=node).inc(size)
            self.metrics.latency.labels(node=node).observe(elapsed)
            observe(self.metrics.stage.labels(Stage.PLACED_TO_FORWARDED, node), seconds_since(placed.occurred_at))
        self.summary.forwarded()
        await msg.ack()

    def _remember(self, placement_id: str) -> None:
        self.recorded[placement_id] = None
        while len(self.recorded) > RECORDED_MAX:
            self.recorded.popitem(last=False)

    async def _record_failure(
        self, placed: ev.InstancePlacedV1, outcome: Outcome, delivery: int, ctx: tuple[str, str]
    ) -> bool:
        """A node failure on the log (a liveness witness), once per message and delivery."""
        try:
            await self.bus.publish(
                ev.InstanceForwardFailedV1(
                    event_id=ev.fact_id("forward_failed", placed.event_id, delivery, "node"),
                    traceparent=ctx[0],
                    tracestate=ctx[1],
                    sop_instance_uid=placed.sop_instance_uid,
                    study_instance_uid=placed.study_instance_uid,
                    node_id=self.node.id,
                    placement_id=placed.event_id,
                    reason=outcome.reason,
                    permanent=False,
                    delivery=delivery,
                    node_failure=True,
                )
            )
        except (BusUnavailable, PublishUncertain):
            return False
        return True

    async def _present(self, sop_instance_uid: str) -> bool | None:
        """Is the instance on the node? None when the node cannot be asked."""
        if not self.node.rest_url:
            return None
        if self._client is None:
            try:
                self._client = OrthancClient(self.node, timeout=min(5.0, self.cfg.forwarder.network_timeout_s))
            except ValueError:
                return None
        client = self._client
        try:
            return await asyncio.to_thread(client.instance_id, sop_instance_uid) is not None
        except (OrthancError, ValueError, TypeError, AttributeError):
            return None

    async def _already_there(self, msg, placed: ev.InstancePlacedV1, hand_back: bool) -> bool | None:
        """Whether a placement that may have been sent already is on its node, asking
        until the node answers; None when the node's state changed meanwhile (re-decide).

        Held while the node cannot be asked; a removed node that cannot be asked
        holds nothing (its copy, if any, is the operator's)."""
        held = False
        try:
            while True:
                present = await self._present(placed.sop_instance_uid)
                if present is not None:
                    return present
                if self.member.removed:
                    return False
                if hand_back and not self.gone:
                    return None
                if not held:
                    held = True
                    self.holding += 1
                    self.metrics.held.labels(node=self.node.id).inc()
                    log.warning(
                        "%s: cannot ask the node whether it holds %s; holding it", self.node.id, placed.sop_instance_uid
                    )
                changed = self.changed
                with self._only_waiting():
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(changed.wait(), HOLD_POLL_S)
        finally:
            if held:
                self.holding -= 1
                self.metrics.held.labels(node=self.node.id).dec()

    async def _hand_back(self, msg, placed: ev.InstancePlacedV1, delivery: int) -> bool:
        """Hand a gone node's placement back, unless it is on the node already; False
        when the node came back meanwhile (deliver it after all)."""
        node = self.node.id
        try:
            # A first delivery was never sent by anyone; a redelivery may have been.
            if delivery > 1:
                present = await self._already_there(msg, placed, hand_back=True)
                if present is None:
                    return False
                if present:
                    await self._settled(msg, placed, 0.0, 0, already_present=True)
                    return True
            gone = ev.FailureReason.NODE_REMOVED if self.member.removed else ev.FailureReason.NODE_DOWN
            await self._failed(msg, placed, Outcome(False, True, gone), delivery)
        except (BusUnavailable, PublishUncertain) as exc:
            log.warning("%s: hand-back of %s not recorded (%s)", node, placed.sop_instance_uid, exc)
        return True

    async def _failed(
        self, msg, placed: ev.InstancePlacedV1, outcome: Outcome, delivery: int, ctx: tuple[str, str] | None = None
    ) -> None:
        node = self.node.id
        traceparent, tracestate = ctx or (placed.traceparent, placed.tracestate)
        gone = outcome.reason in ev.NODE_GONE_REASONS
        tries = INSTANCE_TRIES if outcome.instance else self.cfg.forwarder.max_deliver
        last = outcome.permanent or delivery >= tries
        if last and not gone and delivery > 1:
            # It may have landed on an earlier delivery (or this one, unanswered): never
            # dead-letter what the node holds.
            present = await self._already_there(msg, placed, hand_back=False)
            if present:
                await self._settled(msg, placed, 0.0, 0, already_present=True, ctx=(traceparent, tracestate))
                return
        self.metrics.failures.labels(node=node, permanent=str(outcome.permanent).lower()).inc()
        log.warning(
            "%s: delivery %d of %s failed: %s%s",
            node,
            delivery,
            placed.sop_instance_uid,
            outcome.reason,
            " (final)" if last else "",
        )
        await self.bus.publish(
            ev.InstanceForwardFailedV1(
                event_id=ev.fact_id("forward_failed", placed.event_id, delivery),
                traceparent=traceparent,
                tracestate=tracestate,
                sop_instance_uid=placed.sop_instance_uid,
                study_instance_uid=placed.study_instance_uid,
                node_id=node,
                placement_id=placed.event_id,
                reason=outcome.reason,
                permanent=outcome.permanent,
                delivery=delivery,
                status=outcome.status,
            )
        )
        if not last:
            backoff = self.cfg.forwarder.retry_backoff_s
            delay = backoff[min(delivery, len(backoff)) - 1] if backoff else 1.0
            # A second try of a rejected/aborted instance comes quickly: it is the last one.
            await msg.nak(delay=min(delay, 0.5) if outcome.instance else delay)
            return
        await self.bus.publish(
            ev.InstanceDeadLetteredV1(
                event_id=ev.fact_id("dead_lettered", placed.event_id),
                traceparent=traceparent,
                tracestate=tracestate,
                sop_instance_uid=placed.sop_instance_uid,
                study_instance_uid=placed.study_instance_uid,
                node_id=node,
                placement_id=placed.event_id,
                reason=outcome.reason if gone else f"{outcome.reason} after {delivery} deliveries",
                received_seq=placed.received_seq,
                attempt=placed.attempt,
                avoid=placed.avoid,
                pool=placed.pool,
                counts_as_attempt=not gone,
                handbacks=placed.handbacks,
            )
        )
        self.metrics.dead.labels(node=node).inc()
        self.metrics.dead_by_reason.labels(node, reason_label(outcome.reason)).inc()
        await msg.term()
