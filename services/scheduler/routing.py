"""Routing rules: which pools of nodes an instance may go to. Pure, no I/O.

A rule matches on the received event's fields (modality, calling/called AE,
SOP class, study description, ...) and on the header tags ingest carried in
``extra_tags``, each by exact value or fnmatch glob. The first matching rule
wins and names one or more pools (fan-out: one placement per pool); no match
sends the instance to the built-in pool "all" (every node). A pool restricts
the candidates: a node outside it is never considered, so when no node of the
pool can take work the instance waits rather than going elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from services.scheduler.policy import NodeView
from shared.config import RoutingRule
from shared.events import InstanceReceivedV1

DEFAULT_POOL = "all"


@dataclass(frozen=True)
class Route:
    # The matching rule's name; "" when no rule matched (default pool).
    rule: str
    pools: tuple[str, ...]


DEFAULT_ROUTE = Route("", (DEFAULT_POOL,))


def header_value(received: InstanceReceivedV1, key: str) -> str | None:
    """A named field of the received event, else a carried header tag; None when absent."""
    if key != "extra_tags" and key in InstanceReceivedV1.__struct_fields__:
        value = getattr(received, key)
        return value if isinstance(value, str) else str(value)
    return received.extra_tags.get(key)


def matches(rule: RoutingRule, received: InstanceReceivedV1) -> bool:
    """Every key of the rule matches (exact value or glob; a list: any of them)."""
    for key, wanted in rule.match.items():
        value = header_value(received, key)
        if value is None:
            return False
        patterns = [wanted] if isinstance(wanted, str) else wanted
        if not any(fnmatchcase(value, p) for p in patterns):
            return False
    return True


def route(received: InstanceReceivedV1, rules: Iterable[RoutingRule]) -> Route:
    """First matching rule wins; none: the default pool."""
    for rule in rules:
        if matches(rule, received):
            return Route(rule.name, tuple(rule.pools))
    return DEFAULT_ROUTE


def pool_members(pool: str, pools: Mapping[str, list[str]]) -> frozenset[str] | None:
    """Node ids of a pool; None for "all" (no restriction). An unknown pool has no node."""
    if pool == DEFAULT_POOL:
        return None
    return frozenset(pools.get(pool, ()))


def in_pool(nodes: Iterable[NodeView], pool: str, pools: Mapping[str, list[str]]) -> list[NodeView]:
    """Only the pool's nodes are candidates."""
    members = pool_members(pool, pools)
    return list(nodes) if members is None else [n for n in nodes if n.node_id in members]
