"""Operator actions the scheduler carries out: retry of a dead letter, routing rules from the log.

Both come from the console (the catalog identity publishes them, services/catalog/console).
A retry is placed again like a re-placement, with the attempts reset (the operator
decided it is worth trying) and to the chosen node when that node can take work
(even outside the instance's routing pool: an operator's explicit choice), else to
the scheduler's choice within the pool. Routing rules are log-backed
config: every replica applies the latest ``routing.rules_changed.v1`` (read at start,
then followed), so a change reaches all replicas, survives restarts and is audited
(who, when, why) like any other fact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.errors

from services.scheduler.policy import score
from shared import events as ev
from shared.bus import SUBJECT_RULES_CHANGED
from shared.config import parse_routing
from shared.telemetry import current_trace_context

if TYPE_CHECKING:
    from services.scheduler.scheduler import Scheduler

log = logging.getLogger("switchyard.scheduler")


class OperatorActions:
    """The scheduler's side of the console's actions (one per scheduler replica)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.rules_seq = 0

    def apply_rules(self, seq: int, event: ev.RoutingRulesChangedV1) -> None:
        if seq <= self.rules_seq:
            return
        try:
            routing = parse_routing(event.document)
        except ValueError as exc:
            log.warning("routing rules at stream seq %d not applied (%s); keeping the current ones", seq, exc)
            return
        self.rules_seq = seq
        self.s.cfg = msgspec.structs.replace(self.s.cfg, routing=routing)
        log.info("routing rules from stream seq %d applied (%d rules, set by %s)", seq, len(routing.rules), event.actor)

    async def load_rules(self) -> None:
        """The latest rules on the log, before placing anything (none: the config's)."""
        bus = self.s.bus
        try:
            raw = await bus.js.get_last_msg(bus.cfg.events_stream, SUBJECT_RULES_CHANGED)
        except (nats.js.errors.NotFoundError, nats.errors.Error) as exc:
            if not isinstance(exc, nats.js.errors.NotFoundError):
                log.warning("latest routing rules not readable (%s); following from the start", type(exc).__name__)
            return
        if raw.subject and raw.data and raw.seq:
            event = bus.checked(raw.subject, raw.data, raw.seq)
            if isinstance(event, ev.RoutingRulesChangedV1):
                self.apply_rules(raw.seq, event)

    async def follow_rules(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async for batch in self.s.bus.follow_batches(
                    self.rules_seq + 1, 16, 1.0, stop, subject=SUBJECT_RULES_CHANGED, linger=0.0
                ):
                    for d in batch:
                        if isinstance(d.event, ev.RoutingRulesChangedV1):
                            self.apply_rules(d.seq, d.event)
            except Exception as exc:  # noqa: BLE001 - the follower must keep running
                log.warning("routing rules follower stopped (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def handle_retry(self, msg: Any) -> None:
        """Place a dead letter again: to the chosen node if it can take work, else the scheduler's choice."""
        s = self.s
        retry = await s.bus.accept(msg)
        if retry is None:
            return
        if not isinstance(retry, ev.InstanceRetryRequestedV1) or retry.received_seq <= 0:
            await msg.ack()
            return
        received = await s.received_event(msg, retry.received_seq)
        if received is None:
            return
        attempt = retry.attempt + 1
        event_id = ev.fact_id("placed", "operator_retry", retry.event_id)
        placed: ev.InstancePlacedV1 | None = None
        if retry.node_id:
            # An operator's explicit choice: that node when it can take work, even outside the
            # instance's routing pool (the pool describes automatic placement; the operator decided).
            chosen = [v for v in s.live.views(time.monotonic()) if v.node_id == retry.node_id and v.eligible]
            if chosen:
                placed = self._to_node(retry, received, attempt, event_id, score(chosen[0], s.weights))
            else:
                log.warning(
                    "retry of %s: node %s cannot take work now; the scheduler chooses",
                    retry.sop_instance_uid,
                    retry.node_id,
                )
        if placed is None:
            try:
                placed = await s.decide(
                    retry.received_seq,
                    received,
                    attempt,
                    (),
                    retry.placement_id,
                    ev.PlacementReason.OPERATOR_RETRY,
                    pool=retry.pool,
                    event_id=event_id,
                )
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("affinity lookup for %s failed (%s); retrying", retry.sop_instance_uid, exc)
                await msg.nak(delay=s.cfg.scheduler.no_node_retry_s)
                return
        if placed is None:
            s.waiting.inc()
            await msg.nak(delay=s.cfg.scheduler.no_node_retry_s)
            return
        # Attempts reset: later failures get scheduler.max_attempts placements again.
        placed.handbacks = attempt
        if await s._record(placed):
            log.info("retry of %s by %s placed on %s", retry.sop_instance_uid, retry.actor, placed.node_id)
            await msg.ack()

    def _to_node(
        self,
        retry: ev.InstanceRetryRequestedV1,
        received: ev.InstanceReceivedV1,
        attempt: int,
        event_id: str,
        sc: float,
    ) -> ev.InstancePlacedV1:
        """The placement on the operator's node (reserved at once, as decide() does)."""
        self.s.live.reserve(retry.node_id)
        traceparent, tracestate = current_trace_context()
        return ev.InstancePlacedV1(
            event_id=event_id,
            traceparent=traceparent,
            tracestate=tracestate,
            sop_instance_uid=received.sop_instance_uid,
            study_instance_uid=received.study_instance_uid,
            sop_class_uid=received.sop_class_uid,
            transfer_syntax_uid=received.transfer_syntax_uid,
            blob_key=received.blob_key,
            dataset_digest=received.dataset_digest,
            node_id=retry.node_id,
            reason=ev.PlacementReason.OPERATOR_RETRY,
            candidates=[ev.Candidate(retry.node_id, round(sc, 6))],
            attempt=attempt,
            received_seq=retry.received_seq,
            replaces=retry.placement_id,
            pool=retry.pool,
        )
