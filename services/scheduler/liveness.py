"""Liveness: the probe's heartbeats in, node ``down``/``up`` events out.

Owns the smoothed load of every node (``Liveness``: what the policy scores),
the reservations made since each node's last heartbeat, and the watch loop
(``NodeWatch``) that turns a node's failure into one ``down`` event per
transition and a fresh heartbeat back into ``up``.

A node is down on a witness: the probe's heartbeat saying so (REST or C-ECHO
failed), or the node's silence while the probe reports other nodes after its
deadline. Silence of every node at once is the probe (or this scheduler's
link to it) failing, not the nodes: "probe lost" freezes membership (no
``down``, so no hand-backs) and placement keeps the nodes as last seen; the
forwarders' own association failures still fail deliveries.
Transition ids are deterministic (shared.membership), so replicas record each
transition once. Heartbeats come on a core NATS subscription: live telemetry,
no replay needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import overload

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from services.scheduler.policy import NodeView, Weights, score
from shared import events as ev
from shared import membership
from shared.bus import Bus, BusUnavailable, PublishUncertain, provenance_ok
from shared.config import SchedulerConfig
from shared.runtime import wait_or_stop

log = logging.getLogger("switchyard.scheduler.liveness")


@overload
def _smooth(old: float, new: float, alpha: float) -> float: ...
@overload
def _smooth(old: float | None, new: float | None, alpha: float) -> float | None: ...
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
        if self.probe_lost(now):
            # The first heartbeat after a probe loss: the others are on their way, not late.
            self.resumed(now)
        prev = self.heartbeats.get(hb.node_id)
        if prev is not None and prev[1].up and hb.up:
            old = prev[1]
            hb = msgspec.structs.replace(
                hb,
                pending_jobs=round(_smooth(old.pending_jobs, hb.pending_jobs, self.alpha)),
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
        """Last heard up, and not silent by a witness (silence alone is the probe's, not the node's)."""
        seen = self.heartbeats.get(node_id)
        if seen is None or not seen[1].up:
            return False
        return now - seen[0] <= self.timeout_s or not self.silence_witnessed(node_id, now)

    def silence_witnessed(self, node_id: str, now: float) -> bool:
        """The node missed its deadline while the probe reported another node after it."""
        seen = self.heartbeats.get(node_id)
        since = self.watching.setdefault(node_id, now)
        # A node never heard from since this scheduler started (or since the probe came
        # back) gets a longer grace: the probe may be starting too.
        deadline = (max(seen[0], since) + self.timeout_s) if seen else (since + 3 * self.timeout_s)
        if now <= deadline:
            return False
        return any(
            t > deadline
            for other, (t, _) in self.heartbeats.items()
            if other != node_id and self.pool.get(other) is not None
        )

    def probe_lost(self, now: float) -> bool:
        """No heartbeat from any node within the timeout, while some were heard (or the grace passed)."""
        nodes = [m.node.id for m in self.pool.active()]
        if not nodes:
            return False
        heard = [self.heartbeats[n][0] for n in nodes if n in self.heartbeats]
        if heard:
            return now - max(heard) > self.timeout_s
        return now - self.started > 3 * self.timeout_s

    def resumed(self, now: float) -> None:
        """Heartbeats are back after a probe loss: every node's silence counts from now."""
        for m in self.pool.active():
            self.watching[m.node.id] = now

    def views(self, now: float, avoid: frozenset[str] = frozenset()) -> list[NodeView]:
        out = []
        frozen = self.probe_lost(now)
        for m in self.pool.active():
            node_id = m.node.id
            if node_id in avoid:
                continue
            seen = self.heartbeats.get(node_id)
            if seen is None:
                # Nothing heard since this scheduler started: while the probe is lost, the
                # log's membership (not down) is the last word.
                live = frozen and not m.down
                out.append(NodeView(node_id, live=live, drained=m.drained))
                continue
            _, hb = seen
            # Back from "down" only once the "up" event is in the log: the forwarders
            # follow the log, so they deliver to the node again before it gets new work.
            out.append(
                NodeView(
                    node_id,
                    live=self.observed_live(node_id, now) and not m.down,
                    drained=m.drained,
                    pending_jobs=hb.pending_jobs,
                    instance_count=hb.instance_count,
                    disk_free_bytes=hb.disk_free_bytes,
                    cpu_percent=hb.cpu_percent,
                    rtt_ms=hb.rtt_ms,
                    reserved=self.reserved.get(node_id, 0),
                )
            )
        return out


class NodeWatch:
    """Feeds ``Liveness`` from heartbeats, records down/up transitions, exports liveness gauges."""

    def __init__(
        self, cfg: SchedulerConfig, bus: Bus, pool: membership.Pool, live: Liveness, registry: CollectorRegistry
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.pool = pool
        self.live = live
        self.weights: Weights = cfg.weights
        self.hb_decoder = msgspec.json.Decoder(ev.NodeHeartbeatV1)
        self.sent_transitions: set[str] = set()
        self.live_nodes = Gauge("switchyard_scheduler_live_nodes", "Nodes eligible for new work", registry=registry)
        self.node_live = Gauge(
            "switchyard_scheduler_node_live", "1 when the node may get new work", ["node"], registry=registry
        )
        self.node_score = Gauge(
            "switchyard_scheduler_node_score", "Load score (lower gets new studies)", ["node"], registry=registry
        )
        self.lost = False
        self.probe_lost = Gauge(
            "switchyard_scheduler_probe_lost",
            "1 while no node's heartbeat arrives: membership frozen (alert on it)",
            registry=registry,
        )

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
        self.export(time.monotonic())

    def export(self, now: float) -> None:
        views = self.live.views(now)
        for view in views:
            self.node_live.labels(node=view.node_id).set(1 if view.eligible else 0)
            self.node_score.labels(node=view.node_id).set(score(view, self.weights))
        self.live_nodes.set(sum(v.eligible for v in views))

    def removed(self, node_id: str) -> None:
        self.node_live.labels(node=node_id).set(0)

    async def check_nodes(self) -> None:
        """A witnessed failure -> "down", fresh heartbeats -> "up": one event per transition."""
        now = time.monotonic()
        lost = self.live.probe_lost(now)
        if lost != self.lost:
            self.lost = lost
            self.probe_lost.set(1 if lost else 0)
            if lost:
                log.warning(
                    "probe lost: no heartbeat from any node for %gs; membership frozen "
                    "(no node marked down, placements go to the nodes as last seen)",
                    self.live.timeout_s,
                )
            else:
                log.warning("probe back: heartbeats resumed, membership follows them again")
        if lost:
            self.export(now)
            return
        for m in self.pool.active():
            node_id = m.node.id
            live = self.live.observed_live(node_id, now)
            if not live and not m.down:
                seen = self.live.heartbeats.get(node_id)
                if seen is not None and not seen[1].up:
                    reason = f"probe: {seen[1].error or 'down'}"
                elif self.live.silence_witnessed(node_id, now):
                    reason = f"no heartbeat for {self.live.timeout_s:g}s while other nodes report"
                else:
                    continue
                await self._transition(m, ev.NodeState.DOWN, reason)
            elif live and m.down:
                await self._transition(m, ev.NodeState.UP, "heartbeats resumed")
        self.export(now)

    async def _transition(self, m: membership.Member, state: ev.NodeState, reason: str) -> None:
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

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check_nodes()
            except Exception:  # noqa: BLE001 - the check must keep running
                log.exception("node check failed")
            await wait_or_stop(stop, self.cfg.check_interval_s)
