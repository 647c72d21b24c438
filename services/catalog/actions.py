"""Operator actions over HTTP: each one an event on the log (who = principal, when, why = a required reason).

The same handlers serve the console's forms (a session cookie, CSRF checked by
the console's middleware, answered with a redirect back to the page) and API
clients (bearer token, JSON body, answered with JSON). Only operators may act.
The scheduler carries out retries and rules (services/scheduler/operator.py);
node changes are membership events as ``switchyard nodes`` records them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.catalog.auth import require_role
from shared import events as ev
from shared import membership
from shared.config import NodeConfig, RoutingConfig, parse_routing

MAX_REASON = 500
MAX_RULES = 64 * 1024
_NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UID = re.compile(r"^[0-9.]{1,64}$")

Publish = Callable[[ev.Event], Awaitable[Any]]
PUBLISH_KEY = web.AppKey("publish", object)  # Publish | None: None when the server has no bus (tests)
POOL_KEY = web.AppKey("pool", object)  # membership.Pool | None
ROUTING_KEY = web.AppKey("routing", RoutingConfig)


def _error(cls: type[web.HTTPException], message: str) -> web.HTTPException:
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def _fields(request: web.Request) -> dict[str, str]:
    """The action's fields: a JSON object (API) or a form (console)."""
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise _error(web.HTTPBadRequest, "body is not JSON") from None
        if not isinstance(body, dict):
            raise _error(web.HTTPBadRequest, "body must be a JSON object")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _reason(fields: dict[str, str]) -> str:
    reason = fields.get("reason", "").strip()
    if not reason:
        raise _error(web.HTTPBadRequest, "a reason is required (it is recorded with the action)")
    if len(reason) > MAX_REASON:
        raise _error(web.HTTPBadRequest, f"reason longer than {MAX_REASON} characters")
    return reason


async def _record(request: web.Request, event: ev.Event) -> None:
    publish = request.app[PUBLISH_KEY]
    if publish is None:
        raise _error(web.HTTPServiceUnavailable, "this server cannot record actions (no bus)")
    try:
        await publish(event)  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the caller learns the action was not recorded
        raise _error(
            web.HTTPServiceUnavailable, f"the action was not recorded ({type(exc).__name__}); try again"
        ) from None


def _done(request: web.Request, fields: dict[str, str], result: dict[str, Any]) -> web.Response:
    """JSON for API clients; a redirect back for the console's forms (only to a local path)."""
    back = fields.get("next", "")
    if request.content_type != "application/json" and back.startswith("/") and not back.startswith("//"):
        raise web.HTTPSeeOther(back + ("&" if "?" in back else "?") + "done=" + result["action"])
    return web.json_response(result, status=202)


async def open_dead_letters(request: web.Request, uid: str | None = None) -> list[dict[str, Any]]:
    """Dead-lettered locations not placed again nor cancelled, with what a retry needs."""
    from services.catalog.api import STORE_KEY

    store = request.app[STORE_KEY]
    sql = (
        "SELECT l.sop_instance_uid, l.study_instance_uid, l.node_id, l.pool, l.placement_id, l.detail AS reason,"
        " l.updated_at AS at, CAST(e.payload AS VARCHAR) AS payload"
        " FROM locations l JOIN events e ON e.seq = l.updated_seq"
        f" WHERE l.state = '{ev.LocationState.DEAD_LETTERED}'"
        + (" AND l.sop_instance_uid = ?" if uid else "")
        + " ORDER BY l.updated_seq DESC LIMIT 1000"
    )
    rows = await asyncio.to_thread(store.rows, sql, [uid] if uid else [])
    out = []
    for r in rows:
        payload = json.loads(r.pop("payload"))
        r["received_seq"] = payload.get("received_seq", 0)
        r["attempt"] = payload.get("attempt", 0)
        r["final"] = payload.get("final", False)
        out.append(r)
    return out


def _active_nodes(request: web.Request) -> set[str]:
    pool = request.app[POOL_KEY]
    return {m.node.id for m in pool.active()} if isinstance(pool, membership.Pool) else set()


async def _dead_letter_action(request: web.Request) -> tuple[str, dict[str, str], str, dict[str, Any]]:
    """(actor, fields, reason, the open dead letter) for a retry or a cancel; 4xx when there is none."""
    actor = require_role(request, "operator")
    uid = request.match_info["uid"]
    if not _UID.match(uid):
        raise _error(web.HTTPBadRequest, "not a SOP Instance UID")
    fields = await _fields(request)
    reason = _reason(fields)
    pool = fields.get("pool")
    letters = [d for d in await open_dead_letters(request, uid) if pool is None or d["pool"] == pool]
    if not letters:
        raise _error(web.HTTPConflict, "no open dead letter for this instance (already retried or cancelled?)")
    return actor, fields, reason, letters[0]


async def retry(request: web.Request) -> web.Response:
    actor, fields, reason, d = await _dead_letter_action(request)
    node = fields.get("node", "").strip()
    if node and node not in _active_nodes(request):
        raise _error(web.HTTPBadRequest, f"node {node!r} is not an active node")
    event = ev.InstanceRetryRequestedV1(
        event_id=ev.fact_id("retry_requested", d["placement_id"]),
        sop_instance_uid=d["sop_instance_uid"],
        study_instance_uid=d["study_instance_uid"] or "",
        node_id=node,
        actor=actor,
        reason=reason,
        placement_id=d["placement_id"],
        received_seq=d["received_seq"],
        attempt=d["attempt"],
        pool=d["pool"] or "",
    )
    await _record(request, event)
    return _done(request, fields, {"action": "retry_requested", "event_id": event.event_id, "node": node or None})


async def cancel(request: web.Request) -> web.Response:
    actor, fields, reason, d = await _dead_letter_action(request)
    event = ev.InstanceDeadLetterCancelledV1(
        event_id=ev.fact_id("dead_letter_cancelled", d["placement_id"]),
        sop_instance_uid=d["sop_instance_uid"],
        study_instance_uid=d["study_instance_uid"] or "",
        node_id=d["node_id"] or "",
        placement_id=d["placement_id"],
        actor=actor,
        reason=reason,
    )
    await _record(request, event)
    return _done(request, fields, {"action": "dead_letter_cancelled", "event_id": event.event_id})


_NODE_ACTIONS = {"drain": "drained", "undrain": "undrained", "remove": "removed"}


async def node_action(request: web.Request) -> web.Response:
    actor = require_role(request, "operator")
    node_id, action = request.match_info["node_id"], request.match_info["action"]
    if action not in _NODE_ACTIONS:
        raise _error(web.HTTPNotFound, f"no node action {action!r}; one of {', '.join(_NODE_ACTIONS)}")
    fields = await _fields(request)
    reason = _reason(fields)
    pool = request.app[POOL_KEY]
    if not isinstance(pool, membership.Pool):
        raise _error(web.HTTPServiceUnavailable, "membership not known to this server")
    member = pool.get(node_id)
    if member is None or member.removed:
        raise _error(web.HTTPNotFound, f"no node {node_id!r}")
    event = membership.transition(member, node_id, _NODE_ACTIONS[action], reason)
    event.actor = actor
    await _record(request, event)
    return _done(request, fields, {"action": f"node_{_NODE_ACTIONS[action]}", "event_id": event.event_id})


async def node_add(request: web.Request) -> web.Response:
    actor = require_role(request, "operator")
    fields = await _fields(request)
    reason = _reason(fields)
    node_id = fields.get("node_id", "").strip()
    if not _NODE_ID.match(node_id):
        raise _error(web.HTTPBadRequest, "node_id must be 1-64 of A-Z a-z 0-9 _ -")
    pool = request.app[POOL_KEY]
    if not isinstance(pool, membership.Pool):
        raise _error(web.HTTPServiceUnavailable, "membership not known to this server")
    member = pool.get(node_id)
    if member is not None and not member.removed:
        raise _error(web.HTTPConflict, f"node {node_id} exists (remove it first)")
    try:
        node = NodeConfig(
            id=node_id,
            host=fields.get("host", "127.0.0.1").strip() or "127.0.0.1",
            dicom_port=int(fields.get("dicom_port", "0")),
            ae_title=fields.get("ae_title", "").strip(),
            rest_url=fields.get("rest_url", "").strip(),
            username=fields.get("username", "").strip(),
        )
    except (ValueError, TypeError) as exc:
        raise _error(web.HTTPBadRequest, f"invalid node: {exc}") from None
    if not (0 < node.dicom_port < 65536) or not node.ae_title or not node.rest_url:
        raise _error(web.HTTPBadRequest, "dicom_port (1-65535), ae_title and rest_url are required")
    event = membership.transition(member, node_id, "added", reason, node)
    event.actor = actor
    await _record(request, event)
    return _done(request, fields, {"action": "node_added", "event_id": event.event_id})


async def current_rules(request: web.Request) -> dict[str, Any]:
    """The rules in force: the latest rules_changed event on the log, else the config's."""
    from services.catalog.api import STORE_KEY

    rows = await asyncio.to_thread(
        request.app[STORE_KEY].rows,
        "SELECT seq, occurred_at, CAST(payload AS VARCHAR) AS payload FROM events"
        " WHERE type = 'routing.rules_changed.v1' ORDER BY seq DESC LIMIT 1",
        [],
    )
    if rows:
        payload = json.loads(rows[0]["payload"])
        return {
            "source": "log",
            "seq": rows[0]["seq"],
            "at": rows[0]["occurred_at"],
            "actor": payload.get("actor", ""),
            "reason": payload.get("reason", ""),
            "document": payload.get("document", ""),
        }
    routing = request.app[ROUTING_KEY]
    return {"source": "config", "seq": None, "at": None, "actor": "", "reason": "", "document": rules_toml(routing)}


def rules_toml(routing: RoutingConfig) -> str:
    """The config's routing table as a rules document (TOML), for the console's editor."""
    lines = []
    if routing.pools:
        lines.append("[pools]")
        lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in routing.pools.items()]
        lines.append("")
    for rule in routing.rules:
        lines += ["[[rules]]", f"name = {json.dumps(rule.name)}", f"pools = {json.dumps(rule.pools)}"]
        if rule.match:
            lines.append(
                "match = { " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in rule.match.items()) + " }"
            )
        lines.append("")
    return "\n".join(lines)


async def get_rules(request: web.Request) -> web.Response:
    from services.catalog.api import _json

    return _json(await current_rules(request))


async def set_rules(request: web.Request) -> web.Response:
    """Record a new rules document (validated here; every scheduler replica applies the latest)."""
    actor = require_role(request, "operator")
    fields = await _fields(request)
    reason = _reason(fields)
    document = fields.get("document", "")
    if len(document) > MAX_RULES:
        raise _error(web.HTTPRequestEntityTooLarge, f"rules document longer than {MAX_RULES} bytes")
    try:
        routing = parse_routing(document)
    except ValueError as exc:
        raise _error(web.HTTPBadRequest, f"invalid rules: {exc}") from None
    event = ev.RoutingRulesChangedV1(
        event_id=ev.fact_id("rules_changed", actor, ev.utcnow().isoformat()),
        document=document,
        actor=actor,
        reason=reason,
    )
    await _record(request, event)
    return _done(request, fields, {"action": "rules_changed", "event_id": event.event_id, "rules": len(routing.rules)})
