"""Membership: the pool of nodes as the log says it is.

Config nodes seed the pool; ``node.state`` events (added, drained, undrained,
removed, down, up) apply over them in log order, so every process folding the
same log (scheduler replicas, forwarders, probe, the CLI) sees the same pool,
and changes made at run time need no restart.

The id of a state event is derived from the node, the new state and the stream
sequence of the node's previous state event: two scheduler replicas that see
the same missed heartbeats publish the same "down" fact, recorded once, and a
later transition to the same state (after an "up") is a new fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shared import events as ev
from shared.bus import SUBJECT_NODE_STATE_ALL, Bus
from shared.config import NodeConfig, NodeCredentials
from shared.readmodel.replay import LogTruncated, ensure_log_holds

log = logging.getLogger(__name__)

STATES = tuple(ev.NodeState)


@dataclass
class Member:
    node: NodeConfig
    drained: bool = False
    removed: bool = False
    down: bool = False
    # Stream sequence of the node's last state event (0: only from config).
    last_seq: int = 0

    @property
    def state(self) -> str:
        if self.removed:
            return ev.NodeState.REMOVED
        if self.down:
            return ev.NodeState.DOWN
        return ev.NodeState.DRAINED if self.drained else "active"


class Pool:
    """Fold of the node.state events over the configured nodes (pure, no I/O)."""

    def __init__(self, seed: list[NodeConfig], credentials: NodeCredentials | None = None) -> None:
        self.credentials = credentials or NodeCredentials()
        self.members: dict[str, Member] = {n.id: Member(n) for n in seed}
        self.last_seq = 0

    def apply(self, seq: int, event: ev.NodeStateChangedV1) -> Member | None:
        """Apply one state event; returns the member it changed (None when ignored)."""
        self.last_seq = max(self.last_seq, seq)
        m = self.members.get(event.node_id)
        if event.state == ev.NodeState.ADDED:
            node = node_from(event, m.node if m else None, self.credentials)
            if m is None:
                m = self.members[event.node_id] = Member(node)
            else:
                m.node, m.removed, m.down = node, False, False
        elif m is None:
            log.warning("state %s for unknown node %s ignored", event.state, event.node_id)
            return None
        elif event.state == ev.NodeState.DRAINED:
            m.drained = True
        elif event.state == ev.NodeState.UNDRAINED:
            m.drained = False
        elif event.state == ev.NodeState.REMOVED:
            m.removed = True
        elif event.state == ev.NodeState.DOWN:
            m.down = True
        elif event.state == ev.NodeState.UP:
            m.down = False
        else:
            log.warning("unknown node state %r for %s ignored", event.state, event.node_id)
            return None
        m.last_seq = seq
        return m

    def active(self) -> list[Member]:
        """Members not removed, in id order."""
        return [m for _, m in sorted(self.members.items()) if not m.removed]

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)


def node_from(
    event: ev.NodeStateChangedV1, base: NodeConfig | None = None, credentials: NodeCredentials | None = None
) -> NodeConfig:
    """The NodeConfig an "added" event describes (unset fields keep ``base`` or the defaults).

    The password never comes from the event: it is the seeded node's, or ``credentials``'.
    """
    creds = credentials or NodeCredentials()
    base = base or NodeConfig(id=event.node_id, username=creds.username, password=creds.password)
    return NodeConfig(
        id=event.node_id,
        host=event.host or base.host,
        dicom_port=event.dicom_port or base.dicom_port,
        ae_title=event.ae_title or base.ae_title,
        rest_url=event.rest_url or base.rest_url,
        username=event.username or base.username,
        password=base.password,
    )


def transition(
    member: Member | None, node_id: str, state: ev.NodeState | str, reason: str = "", node: NodeConfig | None = None
) -> ev.NodeStateChangedV1:
    """The state event moving ``node_id`` to ``state``, with its deterministic id."""
    try:
        state = ev.NodeState(state)
    except ValueError:
        raise ValueError(f"unknown node state {state!r}") from None
    after = member.last_seq if member is not None else 0
    fields: dict[str, Any] = {}  # NodeStateChangedV1 keyword arguments of several types
    if node is not None:
        fields = dict(
            host=node.host,
            dicom_port=node.dicom_port,
            ae_title=node.ae_title,
            rest_url=node.rest_url,
            username=node.username,
        )
    return ev.NodeStateChangedV1(
        event_id=ev.fact_id("node_state", node_id, state, after), node_id=node_id, state=state, reason=reason, **fields
    )


async def load(bus: Bus, seed: list[NodeConfig], credentials: NodeCredentials | None = None) -> Pool:
    """The pool as of now: the config seed plus every state event in the log."""
    # Membership is rebuilt from sequence 1 each time: a purged log would silently
    # forget added, drained and removed nodes (LogTruncated says what to do).
    try:
        await ensure_log_holds(bus, "membership", 0)
    except LogTruncated as exc:
        log.error("%s", exc)
        raise
    pool = Pool(seed, credentials)
    async for d in bus.replay(SUBJECT_NODE_STATE_ALL):
        if isinstance(d.event, ev.NodeStateChangedV1):
            pool.apply(d.seq, d.event)
    return pool


async def follow(
    bus: Bus,
    pool: Pool,
    stop: asyncio.Event,
    on_change: Callable[[Member, ev.NodeStateChangedV1], Awaitable[None] | None] | None = None,
) -> None:
    """Apply new state events as they are recorded, until ``stop``."""

    async def loop() -> None:
        async for d in bus.replay(SUBJECT_NODE_STATE_ALL, start_seq=pool.last_seq + 1, follow=True):
            if not isinstance(d.event, ev.NodeStateChangedV1) or d.seq <= pool.last_seq:
                continue
            m = pool.apply(d.seq, d.event)
            log.info("node %s: %s%s", d.event.node_id, d.event.state, f" ({d.event.reason})" if d.event.reason else "")
            if m is not None and on_change is not None:
                result = on_change(m, d.event)
                if asyncio.iscoroutine(result):
                    await result

    task = asyncio.create_task(loop(), name="membership")
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopper):
            t.cancel()
        for t in (task, stopper):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("membership follower stopped: %r", task.exception())
