"""Placement policy: pure functions, no I/O, so it can be tested exhaustively.

Lower score is better. A study stays on the node that got its first instance
while that node is live and not drained. Among nodes whose scores tie (within
``tie``), rendezvous hashing on the study UID picks one, so equal nodes share
new studies evenly and every scheduler replica picks the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from shared.config import Weights
from shared.events import PlacementReason

__all__ = ["Decision", "NodeView", "Weights", "place", "score"]


@dataclass(frozen=True)
class NodeView:
    node_id: str
    live: bool
    drained: bool = False
    pending_jobs: int = 0
    instance_count: int = 0
    disk_free_bytes: int | None = None
    cpu_percent: float | None = None
    rtt_ms: float | None = None
    # Placed by this scheduler since the node's last heartbeat (a reservation:
    # the heartbeat cannot show them yet).
    reserved: int = 0

    @property
    def eligible(self) -> bool:
        return self.live and not self.drained


@dataclass(frozen=True)
class Decision:
    node_id: str
    reason: PlacementReason
    candidates: tuple[tuple[str, float], ...]


def score(node: NodeView, w: Weights) -> float:
    s = w.pending_jobs * node.pending_jobs + w.inflight * node.reserved
    s += w.instances * node.instance_count
    if node.cpu_percent is not None:
        s += w.cpu * node.cpu_percent
    if node.rtt_ms is not None:
        s += w.rtt_ms * node.rtt_ms
    if node.disk_free_bytes is not None:
        s -= w.disk_free_gb * node.disk_free_bytes / 1e9
    return s


def _rendezvous(study_uid: str, node_id: str) -> int:
    digest = hashlib.blake2b(f"{study_uid}|{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place(study_uid: str, nodes: Iterable[NodeView], affinity: str | None, w: Weights) -> Decision | None:
    """Choose a node for one instance of ``study_uid``; None when no node can take it."""
    eligible = [n for n in nodes if n.eligible]
    if not eligible:
        return None
    scored = sorted(((n.node_id, score(n, w)) for n in eligible), key=lambda c: (c[1], c[0]))
    candidates = tuple(scored)
    if affinity is not None and any(node_id == affinity for node_id, _ in scored):
        return Decision(affinity, PlacementReason.AFFINITY, candidates)
    best = scored[0][1]
    tied = [node_id for node_id, s in scored if s <= best + w.tie]
    chosen = max(tied, key=lambda node_id: _rendezvous(study_uid, node_id))
    return Decision(chosen, PlacementReason.FAILOVER if affinity is not None else PlacementReason.NEW_STUDY, candidates)
