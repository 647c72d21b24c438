"""Scheduler: received instances in, one placement decision each out.

Membership (which nodes exist, drained, removed, down) is folded from the
node.state events in the log and followed live (shared.membership). Load and
liveness come from the probe's heartbeats (core NATS subscription: live
telemetry, no replay needed), smoothed. A periodic check turns missed
heartbeats (a dead node, or a silent probe) into one "down" event per
transition and a fresh heartbeat back into "up" (deterministic ids, so
replicas record each transition once).

Study affinity lives in a JetStream KV bucket keyed by a hash of the study
UID: the first placement of a study is a KV ``create`` (compare-and-set), so
two replicas racing on a brand-new study agree on the winner's node, and the
affinity survives restarts without replaying the log. Placement ids are
deterministic (received stream sequence + attempt), so a redelivered received
message cannot be placed twice.

Routing (``routing.py``): the first matching rule names the pools an instance
goes to, one placement per pool (fan-out); affinity is kept per (pool, study).

Re-placement: every dead-lettered placement (delivery failed for good, or the
forwarder gave up on a down/removed node's backlog) is consumed from the
shared durable ``scheduler-replace`` consumer, and every failed verification
(the probe could not confirm the delivery on the node) from ``scheduler-verify``;
either is placed again in its pool with attempt+1, avoiding the nodes that
already failed it, at most ``scheduler.max_attempts`` placements per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.scheduler.policy import NodeView, Weights, place, score
from services.scheduler.routing import DEFAULT_POOL, in_pool, route
from shared import events as ev
from shared import membership
from shared.bus import (
    AFFINITY_BUCKET, SUBJECT_HEARTBEAT_ALL, Bus, BusUnavailable, PublishUncertain, provenance_ok,
    replacement_consumer, scheduler_consumer, verification_failed_consumer,
)
from shared.config import Config, SchedulerConfig
from shared.runtime import running_service, wait_or_stop
from shared.telemetry import context_from, current_trace_context

log = logging.getLogger("switchyard.scheduler")

# Dead-letter reasons the forwarder gives when the node itself is gone.
NODE_GONE_REASONS = ("node down", "node removed")


def weights_from(cfg: SchedulerConfig) -> Weights:
    return Weights(
        pending_jobs=cfg.weight_pending_jobs, inflight=cfg.weight_inflight, cpu=cfg.weight_cpu,
        instances=cfg.weight_instances, rtt_ms=cfg.weight_rtt_ms, disk_free_gb=cfg.weight_disk_free_gb,
    )


def _smooth(old: float | None, new: float | None, alpha: float) -> float | None:
    if new is None or old is None:
        return new
    return alpha * new + (1 - alpha) * old


class Liveness:
    """Heartbeats per node (smoothed load), reservations since the last one."""

    def __init__(self, pool: membership.Pool, timeout_s: float, alpha: float, now: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.alpha = alpha
        self.heartbeats: dict[str, tuple[float, ev.NodeHeartbeatV1]] = {}
        self.reserved: dict[str, int] = {}
        # When this scheduler started watching each node: silence counts from here.
        self.watching: dict[str, float] = {}
        self.started = now

    def heartbeat(self, hb: ev.NodeHeartbeatV1, now: float) -> None:
        if self.pool.get(hb.node_id) is None:
            return
        prev = self.heartbeats.get(hb.node_id)
        if prev is not None and prev[1].up and hb.up:
            old = prev[1]
            hb = msgspec.structs.replace(
                hb, pending_jobs=round(_smooth(old.pending_jobs, hb.pending_jobs, self.alpha)),
                rtt_ms=_smooth(old.rtt_ms, hb.rtt_ms, self.alpha),
                cpu_percent=_smooth(old.cpu_percent, hb.cpu_percent, self.alpha),
            )
        self.heartbeats[hb.node_id] = (now, hb)
        self.reserved[hb.node_id] = 0

    def reserve(self, node_id: str) -> None:
        self.reserved[node_id] = self.reserved.get(node_id, 0) + 1

    def unreserve(self, node_id: str) -> None:
        if self.reserved.get(node_id, 0) > 0:
            self.reserved[node_id] -= 1

    def observed_live(self, node_id: str, now: float) -> bool:
        seen = self.heartbeats.get(node_id)
        return seen is not None and seen[1].up and now - seen[0] <= self.timeout_s

    def silent_for(self, node_id: str, now: float) -> float:
        seen = self.heartbeats.get(node_id)
        since = self.watching.setdefault(node_id, now)
        return now - max(since, seen[0] if seen else since)

    def views(self, now: float, avoid: frozenset[str] = frozenset()) -> list[NodeView]:
        out = []
        for m in self.pool.active():
            node_id = m.node.id
            if node_id in avoid:
                continue
            seen = self.heartbeats.get(node_id)
            if seen is None:
                out.append(NodeView(node_id, live=False, drained=m.drained))
                continue
            _, hb = seen
            # Back from "down" only once the "up" event is in the log: the forwarders
            # follow the log, so they deliver to the node again before it gets new work.
            out.append(NodeView(
                node_id, live=self.observed_live(node_id, now) and not m.down, drained=m.drained,
                pending_jobs=hb.pending_jobs, instance_count=hb.instance_count,
                disk_free_bytes=hb.disk_free_bytes, cpu_percent=hb.cpu_percent, rtt_ms=hb.rtt_ms,
                reserved=self.reserved.get(node_id, 0),
            ))
        return out


class _StudyRef(msgspec.Struct):
    study_instance_uid: str = ""


_study_decoder = msgspec.json.Decoder(_StudyRef)


def _study_of(data: bytes) -> str:
    """The study an event is about (received, dead letter, failed verification); "" if unreadable."""
    try:
        return _study_decoder.decode(data).study_instance_uid
    except msgspec.DecodeError:
        return ""


def study_key(study_uid: str) -> str:
    """KV keys allow few characters: a hash of the study UID (or of an affinity scope)."""
    return "s" + hashlib.blake2b(study_uid.encode(), digest_size=16).hexdigest()


def is_default_pool(pool: str) -> bool:
    return pool in ("", DEFAULT_POOL)


def affinity_scope(study_uid: str, pool: str) -> str:
    """Affinity is per (pool, study); the default pool keeps the bare study (existing KV keys)."""
    return study_uid if is_default_pool(pool) else f"{pool}|{study_uid}"


def placement_id(sop_instance_uid: str, received_seq: int, attempt: int, pool: str) -> str:
    """One id per (instance, attempt, pool); the default pool keeps the id older logs have."""
    parts = (sop_instance_uid, received_seq, attempt) + (() if is_default_pool(pool) else (pool,))
    return ev.fact_id("placed", *parts)


class Affinity:
    """Study -> node, in the KV bucket (shared by replicas), with a local cache."""

    # The KV holds every study; the cache only the recent ones (memory stays bounded).
    CACHE_SIZE = 100_000

    def __init__(self, kv) -> None:
        self.kv = kv
        self.cache: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def _remember(self, study: str, value: tuple[str, int]) -> None:
        self.cache[study] = value
        self.cache.move_to_end(study)
        while len(self.cache) > self.CACHE_SIZE:
            self.cache.popitem(last=False)

    def cached(self, study: str) -> tuple[str, int] | None:
        hit = self.cache.get(study)
        if hit is not None:
            self.cache.move_to_end(study)
        return hit

    async def get(self, study: str) -> tuple[str, int] | None:
        hit = self.cache.get(study)
        if hit is not None:
            self.cache.move_to_end(study)
            return hit
        try:
            entry = await self.kv.get(study_key(study))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        self._remember(study, (entry.value.decode(), entry.revision))
        return self.cache[study]

    async def claim(self, study: str, node_id: str, known: tuple[str, int] | None) -> str:
        """Set the study's node unless another replica got there first; returns the node that holds it."""
        key = study_key(study)
        try:
            if known is None:
                rev = await self.kv.create(key, node_id.encode())
            else:
                rev = await self.kv.update(key, node_id.encode(), last=known[1])
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError,
                nats.js.errors.APIError):
            self.cache.pop(study, None)
            current = await self.get(study)
            return current[0] if current is not None else node_id
        self._remember(study, (node_id, rev))
        return node_id

    def forget_node(self, node_id: str) -> None:
        """A node went down: re-read its studies from the KV (another replica may move them)."""
        for study in [s for s, (n, _) in self.cache.items() if n == node_id]:
            del self.cache[study]


class Scheduler:
    def __init__(self, cfg: Config, bus: Bus, registry: CollectorRegistry, tr, pool: membership.Pool,
                 kv) -> None:
        self.cfg = cfg
        self.bus = bus
        self.tracer = tr
        self.weights = weights_from(cfg.scheduler)
        self.pool = pool
        self.live = Liveness(pool, cfg.scheduler.heartbeat_timeout_s, cfg.scheduler.load_smoothing,
                             time.monotonic())
        self.affinity = Affinity(kv)
        self.hb_decoder = msgspec.json.Decoder(ev.NodeHeartbeatV1)
        self.sent_transitions: set[str] = set()
        self.placements = Counter("switchyard_scheduler_placements", "Placement decisions",
                                  ["node", "reason"], registry=registry)
        self.waiting = Counter("switchyard_scheduler_no_live_node", "Instances that found no live node",
                               registry=registry)
        self.given_up = Counter("switchyard_scheduler_final_dead_letters",
                                "Failed deliveries (dead letters, failed verifications) not placed again",
                                registry=registry)
        self.decision_seconds = Histogram("switchyard_scheduler_decision_seconds", "Decision time",
                                          registry=registry)
        self.live_nodes = Gauge("switchyard_scheduler_live_nodes", "Nodes eligible for new work",
                                registry=registry)
        self.node_live = Gauge("switchyard_scheduler_node_live", "1 when the node may get new work",
                               ["node"], registry=registry)
        self.node_score = Gauge("switchyard_scheduler_node_score", "Load score (lower gets new studies)",
                                ["node"], registry=registry)

    # -- membership and liveness ------------------------------------------------

    async def on_heartbeat(self, msg) -> None:
        try:
            hb = self.hb_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.warning("undecodable heartbeat on %s", msg.subject)
            return
        if not provenance_ok(msg.subject, hb):  # a heartbeat on another node's subject
            log.warning("heartbeat for another node on %s; refused", msg.subject)
            return
        self.live.heartbeat(hb, time.monotonic())
        self._export_live(time.monotonic())

    def _export_live(self, now: float) -> None:
        views = self.live.views(now)
        for view in views:
            self.node_live.labels(node=view.node_id).set(1 if view.eligible else 0)
            self.node_score.labels(node=view.node_id).set(score(view, self.weights))
        self.live_nodes.set(sum(v.eligible for v in views))

    async def on_state(self, member: membership.Member, event: ev.NodeStateChangedV1) -> None:
        if event.state in ("down", "removed", "drained"):
            self.affinity.forget_node(event.node_id)
        if event.state == "removed":
            self.node_live.labels(node=event.node_id).set(0)

    async def check_nodes(self) -> None:
        """Missed heartbeats -> "down", fresh heartbeats -> "up": one event per transition."""
        now = time.monotonic()
        for m in self.pool.active():
            node_id = m.node.id
            live = self.live.observed_live(node_id, now)
            if not live and not m.down:
                seen = self.live.heartbeats.get(node_id)
                if seen is not None and not seen[1].up:
                    reason = f"probe: {seen[1].error or 'down'}"
                elif self.live.silent_for(node_id, now) > self.live.timeout_s * (1 if seen else 3):
                    # A node never heard from since this scheduler started gets a longer grace
                    # (the probe may be starting too).
                    reason = f"no heartbeat for {self.live.timeout_s:g}s"
                else:
                    continue
                await self._transition(m, "down", reason)
            elif live and m.down:
                await self._transition(m, "up", "heartbeats resumed")
        self._export_live(now)

    async def _transition(self, m: membership.Member, state: str, reason: str) -> None:
        event = membership.transition(m, m.node.id, state, reason)
        if event.event_id in self.sent_transitions:
            return
        try:
            ack = await self.bus.publish(event)
        except (BusUnavailable, PublishUncertain) as exc:
            log.warning("node %s %s not recorded (%s)", m.node.id, state, exc)
            return
        self.sent_transitions.add(event.event_id)
        if not ack.duplicate:
            log.warning("node %s marked %s: %s", m.node.id, state, reason)

    async def watch_nodes(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check_nodes()
            except Exception:  # noqa: BLE001 - the check must keep running
                log.exception("node check failed")
            await wait_or_stop(stop, self.cfg.scheduler.check_interval_s)

    # -- placement ----------------------------------------------------------------

    def pool_views(self, pool: str, avoid: tuple[str, ...] = ()) -> list[NodeView]:
        """The nodes of ``pool`` (all for the default pool), without ``avoid``."""
        return in_pool(self.live.views(time.monotonic(), frozenset(avoid)), pool or DEFAULT_POOL,
                       self.cfg.routing.pools)

    async def decide(self, seq: int, received: ev.InstanceReceivedV1, attempt: int = 0,
                     avoid: tuple[str, ...] = (), replaces: str = "", reason: str | None = None,
                     pool: str = "", rule: str = "") -> ev.InstancePlacedV1 | None:
        """One placement in ``pool`` ("": the default pool); None when no node of the pool can take it."""
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
        if decision.reason != "affinity":
            holder = await self.affinity.claim(scope, node_id, known)
            if holder != node_id:
                # The KV names another node (another replica placed the study first, or
                # it predates this scheduler's cache): follow it while it can take work,
                # else move the study away from it.
                again = place(study, views, holder, self.weights)
                if again is not None and again.reason == "affinity":
                    self.live.unreserve(node_id)
                    self.live.reserve(holder)
                    node_id, why = holder, "affinity"
                else:
                    if again is not None and again.node_id != node_id:
                        self.live.unreserve(node_id)
                        self.live.reserve(again.node_id)
                        node_id = again.node_id
                    await self.affinity.claim(scope, node_id, self.affinity.cached(scope))
                    why, moved_from = "failover", holder
            elif known is not None:
                moved_from = known[0]
        if reason is not None:
            why = reason
        elif rule and why != "failover":
            # A rule chose the pool (new study or affinity inside it); a failover still says so.
            why = "rule"
        traceparent, tracestate = current_trace_context()
        return ev.InstancePlacedV1(
            event_id=placement_id(received.sop_instance_uid, seq, attempt, pool),
            traceparent=traceparent, tracestate=tracestate,
            sop_instance_uid=received.sop_instance_uid, study_instance_uid=study,
            sop_class_uid=received.sop_class_uid, transfer_syntax_uid=received.transfer_syntax_uid,
            blob_key=received.blob_key, dataset_digest=received.dataset_digest,
            node_id=node_id, reason=why,
            candidates=[ev.Candidate(n, round(s, 6)) for n, s in decision.candidates],
            attempt=attempt, received_seq=seq, replaces=replaces, avoid=list(avoid),
            study_moved_from=moved_from, rule=rule, pool=pool,
        )

    async def _consume(self, config, handler, stop: asyncio.Event) -> None:
        psub = await self.bus.pull(config)
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
                # One study's messages in log order (its first instance claims the
                # study); different studies concurrently, so their JetStream round
                # trips (KV claim, placement PubAck) overlap.
                by_study: dict[str, list] = {}
                for msg in msgs:
                    by_study.setdefault(_study_of(msg.data), []).append(msg)
                await asyncio.gather(*(self._in_order(group, handler) for group in by_study.values()))
        finally:
            with contextlib.suppress(nats.errors.Error):
                await psub.unsubscribe()

    @staticmethod
    async def _in_order(msgs: list, handler) -> None:
        for msg in msgs:
            await handler(msg)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(
            self._consume(scheduler_consumer(), self.handle, stop),
            self._consume(replacement_consumer(), self.handle_dead_letter, stop),
            self._consume(verification_failed_consumer(), self.handle_verification_failed, stop),
            self.watch_nodes(stop),
        )

    async def _record(self, placed: ev.InstancePlacedV1) -> bool:
        """Publish one placement; False when it is not known to be recorded (the caller does not ack)."""
        try:
            ack = await self.bus.publish(placed)
        except (BusUnavailable, PublishUncertain) as exc:
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
        with self.tracer.start_as_current_span("scheduler.place", context=parent) as span:
            span.set_attribute("dicom.sop_instance_uid", received.sop_instance_uid)
            started = time.perf_counter()
            chosen = route(received, self.cfg.routing.rules)
            if chosen.rule:
                span.set_attribute("switchyard.rule", chosen.rule)
            # One placement per pool (fan-out). A redelivery re-decides every pool; the
            # ones already recorded carry the same id and are dropped as duplicates.
            waiting, recorded = [], True
            for pool in chosen.pools:
                try:
                    placed = await self.decide(seq, received, pool="" if not chosen.rule else pool,
                                               rule=chosen.rule)
                except (nats.errors.Error, asyncio.TimeoutError) as exc:
                    # The affinity bucket did not answer: not acked, tried again.
                    log.warning("affinity lookup for %s failed (%s); retrying", received.sop_instance_uid, exc)
                    await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
                    return
                if placed is None:
                    waiting.append(pool)
                    continue
                span.set_attribute("switchyard.node", placed.node_id)
                span.set_attribute("switchyard.reason", placed.reason)
                recorded = await self._record(placed) and recorded
            self.decision_seconds.observe(time.perf_counter() - started)
            if waiting:
                # Never elsewhere: the instance waits until a node of the pool can take it.
                self.waiting.inc()
                log.warning("no live node in pool %s for %s; retrying in %.1fs", ",".join(waiting),
                            received.sop_instance_uid, self.cfg.scheduler.no_node_retry_s)
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

    async def _replace_from(self, msg, kind: type) -> None:
        failed = await self.bus.accept(msg)  # undecodable or forged: terminated
        if failed is None:
            return
        if not isinstance(failed, kind) or failed.received_seq <= 0:
            await msg.ack()
            return
        attempt = failed.attempt + 1
        if attempt >= self.cfg.scheduler.max_attempts:
            log.warning("%s failed for good after %d placements: %s", failed.sop_instance_uid,
                        attempt, failed.reason)
            self.given_up.inc()
            await msg.ack()
            return
        try:
            raw = await self.bus.js.get_msg(self.cfg.nats.events_stream, failed.received_seq)
        except nats.errors.Error as exc:
            log.warning("received event %d not readable (%s); retrying", failed.received_seq, exc)
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return
        received = self.bus.checked(raw.subject, raw.data, failed.received_seq)
        if not isinstance(received, ev.InstanceReceivedV1):
            await msg.ack()
            return
        node_gone = kind is ev.InstanceDeadLetteredV1 and failed.reason in NODE_GONE_REASONS
        # A node that failed the delivery itself is avoided; a node that was down is
        # not eligible while down, and may take the instance again once back.
        avoid = tuple(dict.fromkeys([*failed.avoid, *([] if node_gone else [failed.node_id])]))
        try:
            placed = await self.decide(failed.received_seq, received, attempt, avoid, failed.placement_id,
                                       "failover" if node_gone else "replacement", pool=failed.pool)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("affinity lookup for %s failed (%s); retrying", failed.sop_instance_uid, exc)
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return
        if placed is None:
            if any(v.eligible for v in self.pool_views(failed.pool)):
                log.warning("%s: no node left in its pool that has not failed it; failed for good",
                            failed.sop_instance_uid)
                self.given_up.inc()
                await msg.ack()
                return
            self.waiting.inc()
            await msg.nak(delay=self.cfg.scheduler.no_node_retry_s)
            return
        if await self._record(placed):
            await msg.ack()


async def affinity_bucket(bus: Bus, cfg: Config):
    storage = StorageType.FILE if cfg.nats.storage == "file" else StorageType.MEMORY
    try:
        return await bus.js.key_value(AFFINITY_BUCKET)
    except (nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
        return await bus.js.create_key_value(KeyValueConfig(
            bucket=AFFINITY_BUCKET, history=1, storage=storage, replicas=cfg.nats.replicas))


async def main(cfg: Config) -> None:
    async with running_service("scheduler", cfg) as svc:
        pool = await membership.load(svc.bus, cfg.nodes, cfg.node_credentials)
        kv = await affinity_bucket(svc.bus, cfg)
        scheduler = Scheduler(cfg, svc.bus, svc.registry, svc.tracer, pool, kv)
        await svc.bus.nc.subscribe(SUBJECT_HEARTBEAT_ALL, cb=scheduler.on_heartbeat)
        follower = asyncio.create_task(membership.follow(svc.bus, pool, svc.stop, scheduler.on_state))
        svc.serve_metrics(cfg.scheduler.metrics_port)
        log.info("scheduling for nodes %s", ", ".join(m.node.id for m in pool.active()))
        try:
            await scheduler.run(svc.stop)
        finally:
            await follower
