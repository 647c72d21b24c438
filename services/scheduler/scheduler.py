"""The decision loop: received instances in, one placement decision each out.

Owns the three durable consumers a scheduler replica shares with the others:
``scheduler`` (received instances: route, then place once per pool),
``scheduler-replace`` (dead letters) and ``scheduler-verify`` (failed
verifications), both placed again in their pool with attempt+1, avoiding the
nodes that already failed the instance, at most ``scheduler.max_attempts``
placements per instance. A dead letter whose node was gone (``node down`` /
``node removed``) is a failover: that node is not avoided once back.

Placement ids are deterministic (received stream sequence + attempt + pool),
so a redelivered received message cannot be placed twice. Scores come from
``liveness``, study affinity from ``affinity``, the choice from ``policy``,
the pools from ``routing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import nats.errors
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.scheduler.affinity import Affinity, affinity_scope, is_default_pool
from services.scheduler.liveness import Liveness, NodeWatch
from services.scheduler.operator import OperatorActions
from services.scheduler.policy import NodeView, place
from services.scheduler.routing import DEFAULT_POOL, in_pool, route
from shared import events as ev
from shared import membership, telemetry
from shared.bus import (
    Bus,
    BusUnavailable,
    PublishUncertain,
    operator_retry_consumer,
    replacement_consumer,
    scheduler_consumer,
    subject_for,
    verification_failed_consumer,
)
from shared.config import Config
from shared.events import PlacementReason
from shared.metrics import Stage, observe, seconds_since, stage_histogram
from shared.telemetry import context_from, current_trace_context

log = logging.getLogger("switchyard.scheduler.scheduler")


class _StudyRef(msgspec.Struct):
    study_instance_uid: str = ""


_study_decoder = msgspec.json.Decoder(_StudyRef)


def _study_of(data: bytes) -> str:
    """The study an event is about (received, dead letter, failed verification); "" if unreadable."""
    try:
        return _study_decoder.decode(data).study_instance_uid
    except msgspec.DecodeError:
        return ""


def placement_id(sop_instance_uid: str, received_seq: int, attempt: int, pool: str) -> str:
    """One id per (instance, attempt, pool); the default pool keeps the id older logs have."""
    parts = (sop_instance_uid, received_seq, attempt) + (() if is_default_pool(pool) else (pool,))
    return ev.fact_id("placed", *parts)


class Scheduler:
    def __init__(self, cfg: Config, bus: Bus, registry: CollectorRegistry, tr, pool: membership.Pool, kv) -> None:
        self.cfg = cfg
        self.bus = bus
        self.tracer = tr
        self.weights = cfg.scheduler.weights
        self.pool = pool
        self.live = Liveness(pool, cfg.scheduler.heartbeat_timeout_s, cfg.scheduler.load_smoothing, time.monotonic())
        self.watch = NodeWatch(cfg.scheduler, bus, pool, self.live, registry)
        self.affinity = Affinity(kv)
        self.placements = Counter(
            "switchyard_scheduler_placements", "Placement decisions", ["node", "reason"], registry=registry
        )
        self.waiting = Counter(
            "switchyard_scheduler_no_live_node", "Instances that found no live node", registry=registry
        )
        self.given_up = Counter(
            "switchyard_scheduler_final_dead_letters",
            "Failed deliveries (dead letters, failed verifications) not placed again",
            registry=registry,
        )
        self.decision_seconds = Histogram("switchyard_scheduler_decision_seconds", "Decision time", registry=registry)
        nodes = [n.id for n in cfg.nodes]
        self.stage = stage_histogram(registry, [Stage.RECEIVED_TO_PLACED], nodes)
        for node in nodes:  # at 0 from the start: the first placement shows in a rate
            for why in PlacementReason:
                self.placements.labels(node=node, reason=why)
        self.operator = OperatorActions(self)

    async def on_state(self, member: membership.Member, event: ev.NodeStateChangedV1) -> None:
        """A membership change from the log: studies on a node that left are read from the KV again."""
        if event.state in (ev.NodeState.DOWN, ev.NodeState.REMOVED, ev.NodeState.DRAINED):
            self.affinity.forget_node(event.node_id)
        if event.state == ev.NodeState.REMOVED:
            self.watch.removed(event.node_id)

    # -- placement ----------------------------------------------------------------

    def pool_views(self, pool: str, avoid: tuple[str, ...] = ()) -> list[NodeView]:
        """The nodes of ``pool`` (all for the default pool), without ``avoid``."""
        return in_pool(
            self.live.views(time.monotonic(), frozenset(avoid)), pool or DEFAULT_POOL, self.cfg.routing.pools
        )

    async def decide(
        self,
        seq: int,
        received: ev.InstanceReceivedV1,
        attempt: int = 0,
        avoid: tuple[str, ...] = (),
        replaces: str = "",
        reason: PlacementReason | None = None,
        pool: str = "",
        rule: str = "",
        event_id: str = "",
        verification_failures: int = 0,
    ) -> ev.InstancePlacedV1 | None:
        """One placement in ``pool`` ("": the default pool); None when no node of the pool can take it.

        ``event_id``: set for a hand-back that used up no attempt (its id comes from the
        placement it replaces, as the attempt number does not move).
        """
        study = received.study_instance_uid
        scope = affinity_scope(study, pool)
        views = self.pool_views(pool, avoid)
        # Only the cache: a study it does not know is claimed straight away (one KV
        # write, no read first); the claim fails if the KV already names a node.
        known = self.affinity.cached(scope)
        decision = place(study, views, known[0] if known else None, self.weights)
        if decision is None:
            return None
        node_id, why, moved_from = decision.node_id, decision.reason, ""
        # Reserve at once: decisions for other studies run concurrently and must see it.
        self.live.reserve(node_id)
        if decision.reason != PlacementReason.AFFINITY:
            holder = await self.affinity.claim(scope, node_id, known)
            if holder != node_id:
                # The KV names another node (another replica placed the study first, or
                # it predates this scheduler's cache): follow it while it can take work,
                # else move the study away from it.
                again = place(study, views, holder, self.weights)
                if again is not None and again.reason == PlacementReason.AFFINITY:
                    self.live.unreserve(node_id)
                    self.live.reserve(holder)
                    node_id, why = holder, PlacementReason.AFFINITY
                else:
                    if again is not None and again.node_id != node_id:
                        self.live.unreserve(node_id)
                        self.live.reserve(again.node_id)
                        node_id = again.node_id
                    await self.affinity.claim(scope, node_id, self.affinity.cached(scope))
                    why, moved_from = PlacementReason.FAILOVER, holder
            elif known is not None:
                moved_from = known[0]
        iscope = affinity_scope(received.sop_instance_uid, pool)
        if not replaces:
            # First placement of this received event: a new version of an instance goes
            # where its first copy is (while that node can take work).
            first_copy = await self.affinity.claim_instance(iscope, node_id, seq)
            if first_copy is not None:
                if first_copy != node_id and any(v.node_id == first_copy and v.eligible for v in views):
                    self.live.unreserve(node_id)
                    self.live.reserve(first_copy)
                    node_id, moved_from = first_copy, ""
                elif first_copy != node_id:
                    await self.affinity.move_instance(iscope, node_id, seq)
                why = PlacementReason.NEW_VERSION
        else:
            await self.affinity.move_instance(iscope, node_id, seq)
        if reason is not None:
            why = reason
        elif rule and why not in (PlacementReason.FAILOVER, PlacementReason.NEW_VERSION):
            # A rule chose the pool (new study or affinity inside it); a failover still says so.
            why = PlacementReason.RULE
        traceparent, tracestate = current_trace_context()
        return ev.InstancePlacedV1(
            event_id=event_id or placement_id(received.sop_instance_uid, seq, attempt, pool),
            traceparent=traceparent,
            tracestate=tracestate,
            sop_instance_uid=received.sop_instance_uid,
            study_instance_uid=study,
            sop_class_uid=received.sop_class_uid,
            transfer_syntax_uid=received.transfer_syntax_uid,
            blob_key=received.blob_key,
            dataset_digest=received.dataset_digest,
            node_id=node_id,
            reason=why,
            candidates=[ev.Candidate(n, round(s, 6)) for n, s in decision.candidates],
            attempt=attempt,
            received_seq=seq,
            replaces=replaces,
            avoid=list(avoid),
            study_moved_from=moved_from,
            rule=rule,
            pool=pool,
            verification_failures=verification_failures,
            received_at=received.occurred_at,
        )

    async def _consume(self, config, handler, stop: asyncio.Event) -> None:
        async with contextlib.aclosing(self.bus.pull_batches(config, 64, stop)) as batches:
            async for msgs in batches:
                # One study's messages in log order (its first instance claims the
                # study); different studies concurrently, so their JetStream round
                # trips (KV claim, placement PubAck) overlap.
                by_study: dict[str, list] = {}
                for msg in msgs:
                    by_study.setdefault(_study_of(msg.data), []).append(msg)
                await asyncio.gather(*(self._in_order(group, handler) for group in by_study.values()))

    @staticmethod
    async def _in_order(msgs: list, handler) -> None:
        for msg in msgs:
            await handler(msg)

    async def run(self, stop: asyncio.Event) -> None:
        await self.operator.load_rules()
        await asyncio.gather(
            self._consume(operator_retry_consumer(), self.operator.handle_retry, stop),
            self.operator.follow_rules(stop),
            self._consume(scheduler_consumer(), self.handle, stop),
            self._consume(replacement_consumer(), self.handle_dead_letter, stop),
            self._consume(verification_failed_consumer(), self.handle_verification_failed, stop),
            self.watch.run(stop),
        )

    async def _record(self, placed: ev.InstancePlacedV1) -> bool:
        """Publish one placement; False when it is not known to be recorded (the caller does not ack)."""
        subject = subject_for(placed)
        with telemetry.span(
            self.tracer,
            f"{subject} publish",
            kind=SpanKind.PRODUCER,
            attributes=telemetry.messaging_attributes(subject, "publish"),
        ) as span:
            # The forwarder's CLIENT spans are children of this one.
            placed.traceparent, placed.tracestate = telemetry.context_of(span)
            try:
                ack = await self.bus.publish(placed)
            except (BusUnavailable, PublishUncertain) as exc:
                telemetry.fail(span, type(exc).__name__)
                # Not acked: JetStream redelivers, and the same placement id dedupes.
                self.live.unreserve(placed.node_id)
                log.warning("placement of %s not recorded (%s); will retry", placed.sop_instance_uid, exc)
                return False
        if ack.duplicate:
            self.live.unreserve(placed.node_id)
            return True  # recorded by an earlier delivery (or another replica): counted there
        self.placements.labels(node=placed.node_id, reason=placed.reason).inc()
        if placed.study_moved_from:
            log.info("study moved from %s to %s (%s)", placed.study_moved_from, placed.node_id, placed.reason)
        return True

    async def handle(self, msg) -> None:
        seq = msg.metadata.sequence.stream
        received = await self.bus.accept(msg)  # undecodable or forged: terminated
        if received is None:
            return
        if not isinstance(received, ev.InstanceReceivedV1):
            await msg.ack()
            return
        parent = context_from(received.traceparent, received.tracestate)
        with telemetry.span(
            self.tracer,
            f"{msg.subject} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        ) as span:
            span.set_attribute("dicom.sop_instance_uid", received.sop_instance_uid)
            span.set_attribute("dicom.sop_class_uid", received.sop_class_uid)
            started = time.perf_counter()
            chosen = route(received, self.cfg.routing.rules)
            if chosen.rule:
                span.set_attribute("switchyard.rule", chosen.rule)
            # One placement per pool (fan-out). A redelivery re-decides every pool; the
            # ones already recorded carry the same id and are dropped as duplicates.
            waiting, recorded = [], True
            for pool in chosen.pools:
                try:
                    placed = await self.decide(seq, received, pool="" if not chosen.rule else pool, rule=chosen.rule)
                except (TimeoutError, nats.errors.Error) as exc:
                    # The affinity bucket did not answer: not acked, tried again.
                    log.warning("affinity lookup for %s failed (%s); retrying", received.sop_instance_uid, exc)
                    await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
                    return
                if placed is None:
                    waiting.append(pool)
                    continue
                span.set_attribute("switchyard.node", placed.node_id)
                span.set_attribute("switchyard.reason", placed.reason)
                placed_now = await self._record(placed)
                recorded = placed_now and recorded
                if placed_now:
                    observe(
                        self.stage.labels(Stage.RECEIVED_TO_PLACED, placed.node_id), seconds_since(received.occurred_at)
                    )
            self.decision_seconds.observe(time.perf_counter() - started)
            if waiting:
                # Never elsewhere: the instance waits until a node of the pool can take it.
                self.waiting.inc()
                log.warning(
                    "no live node in pool %s for %s; retrying in %.1fs",
                    ",".join(waiting),
                    received.sop_instance_uid,
                    self.cfg.scheduler.no_node_retry_s,
                )
                await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
                return
            if recorded:
                await msg.ack()

    async def handle_dead_letter(self, msg) -> None:
        """A placement whose delivery failed for good (or whose node was gone): place it again."""
        await self._replace_from(msg, ev.InstanceDeadLetteredV1)

    async def handle_verification_failed(self, msg) -> None:
        """Delivered, but the probe could not confirm it on the node: a failed delivery, place it again."""
        await self._replace_from(msg, ev.InstanceVerificationFailedV1)

    async def _replace_from(
        self, msg: Msg, kind: type[ev.InstanceDeadLetteredV1 | ev.InstanceVerificationFailedV1]
    ) -> None:
        failed = await self.bus.accept(msg)  # undecodable or forged: terminated
        if failed is None:
            return
        # A re-placement is a child of the failure's span: the instance's trace goes on.
        with telemetry.span(
            self.tracer,
            f"{msg.subject} process",
            context=context_from(failed.traceparent, failed.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=telemetry.messaging_attributes(msg.subject, "process"),
        ) as span:
            span.set_attribute("dicom.sop_instance_uid", getattr(failed, "sop_instance_uid", ""))
            await self._replace(msg, failed, kind)

    async def _replace(
        self, msg: Msg, failed: ev.AnyEvent, kind: type[ev.InstanceDeadLetteredV1 | ev.InstanceVerificationFailedV1]
    ) -> None:
        if (
            not isinstance(failed, (ev.InstanceDeadLetteredV1, ev.InstanceVerificationFailedV1))
            or not isinstance(failed, kind)
            or failed.received_seq <= 0
            or getattr(failed, "final", False)
        ):
            await msg.ack()
            return
        if isinstance(failed, ev.InstanceVerificationFailedV1) and failed.verification_failures >= 1:
            # The same instance failed verification on a second node: the instance, not the
            # nodes, is the problem. Final, for an operator; a third placement would not help.
            await self._final_dead_letter(msg, failed)
            return
        attempt = failed.attempt + 1
        event_id = ""
        # A hand-back because the node went down (the forwarder says so) uses up no attempt,
        # bounded all the same (a flapping node cannot loop an instance forever).
        handbacks = getattr(failed, "handbacks", 0) + (not getattr(failed, "counts_as_attempt", True))
        if attempt - handbacks >= self.cfg.scheduler.max_attempts or attempt >= 4 * self.cfg.scheduler.max_attempts:
            log.warning("%s failed for good after %d placements: %s", failed.sop_instance_uid, attempt, failed.reason)
            self.given_up.inc()
            await msg.ack()
            return
        received = await self.received_event(msg, failed.received_seq)
        if received is None:
            return
        node_gone = kind is ev.InstanceDeadLetteredV1 and failed.reason in ev.NODE_GONE_REASONS
        # A node that failed the delivery itself is avoided; a node that was down is
        # not eligible while down, and may take the instance again once back.
        avoid = tuple(dict.fromkeys([*failed.avoid, *([] if node_gone else [failed.node_id])]))
        try:
            placed = await self.decide(
                failed.received_seq,
                received,
                attempt,
                avoid,
                failed.placement_id,
                PlacementReason.FAILOVER if node_gone else PlacementReason.REPLACEMENT,
                pool=failed.pool,
                event_id=event_id,
                verification_failures=failed.verification_failures + 1
                if isinstance(failed, ev.InstanceVerificationFailedV1)
                else 0,
            )
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("affinity lookup for %s failed (%s); retrying", failed.sop_instance_uid, exc)
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return
        if placed is None:
            if any(v.eligible for v in self.pool_views(failed.pool)):
                log.warning(
                    "%s: no node left in its pool that has not failed it; failed for good", failed.sop_instance_uid
                )
                self.given_up.inc()
                await msg.ack()
                return
            self.waiting.inc()
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return
        placed.handbacks = handbacks
        if await self._record(placed):
            await msg.ack()

    async def received_event(self, msg: Msg, seq: int) -> ev.InstanceReceivedV1 | None:
        """The received event at ``seq``, read back from the log to place it again; None when
        ``msg`` was settled instead (nak: not readable now; ack: not a received event)."""
        try:
            raw = await self.bus.js.get_msg(self.cfg.nats.events_stream, seq)
        except nats.errors.Error as exc:
            log.warning("received event %d not readable (%s); retrying", seq, exc)
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return None
        if raw.subject is None or raw.data is None:  # nats-py types both optional; the server sends both
            log.warning("received event %d came back without subject or data; retrying", seq)
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return None
        received = self.bus.checked(raw.subject, raw.data, seq)
        if not isinstance(received, ev.InstanceReceivedV1):
            await msg.ack()
            return None
        return received

    async def _final_dead_letter(self, msg, failed: ev.InstanceVerificationFailedV1) -> None:
        """Record a failed verification as a final dead letter (not placed again)."""
        nodes = failed.verification_failures + 1
        dead = ev.InstanceDeadLetteredV1(
            event_id=ev.fact_id("dead_lettered_final", failed.node_id, failed.sop_instance_uid, failed.placement_id),
            sop_instance_uid=failed.sop_instance_uid,
            study_instance_uid=failed.study_instance_uid,
            node_id=failed.node_id,
            placement_id=failed.placement_id,
            reason=f"verification failed on {nodes} nodes ({failed.reason}): an instance problem, for an operator",
            received_seq=failed.received_seq,
            attempt=failed.attempt,
            avoid=list(dict.fromkeys([*failed.avoid, failed.node_id])),
            pool=failed.pool,
            final=True,
        )
        dead.traceparent, dead.tracestate = current_trace_context()
        try:
            ack = await self.bus.publish(dead)
        except (BusUnavailable, PublishUncertain) as exc:
            log.warning("final dead letter of %s not recorded (%s); will retry", failed.sop_instance_uid, exc)
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return
        if not ack.duplicate:
            self.given_up.inc()
            log.warning(
                "%s failed verification on %d nodes: dead-lettered for an operator", failed.sop_instance_uid, nodes
            )
        await msg.ack()
