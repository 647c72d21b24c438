"""The catalog's HTTP API: JSON, bearer-token protected, clear 4xx on bad queries.

Query results contain patient values (this is the audit memory); request logs
carry only paths without query strings, and never the values.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from typing import Any

from aiohttp import web

from shared.readmodel.catalog import LOCATION_STATES, CatalogStore

_DATE = re.compile(r"^\d{8}$")
_UID = re.compile(r"^[0-9.]{1,64}$")
MAX_LIMIT = 10000

STORE_KEY = web.AppKey("store", CatalogStore)
TOKEN_KEY = web.AppKey("token", str)
# Latest heartbeat per node (filled by the service from the HEARTBEATS stream).
LOADS_KEY = web.AppKey("loads", dict)
NODES_KEY = web.AppKey("nodes", tuple)


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "1000")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _uid(value: str, name: str) -> str:
    if not _UID.match(value):
        raise _bad(f"{name} is not a DICOM UID")
    return value


@web.middleware
async def auth(request: web.Request, handler):
    if request.path == "/healthz":
        return await handler(request)
    expected = f"Bearer {request.app[TOKEN_KEY]}"
    if not hmac.compare_digest(request.headers.get("Authorization", ""), expected):
        return web.json_response({"error": "missing or wrong bearer token"}, status=401)
    return await handler(request)


async def _query(request: web.Request, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return await asyncio.to_thread(request.app[STORE_KEY].rows, sql, params)


def _json(rows: Any) -> web.Response:
    return web.json_response(rows, dumps=lambda o: json.dumps(o, default=str))


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    return web.json_response({"ok": True, "last_seq": await asyncio.to_thread(store.last_seq)})


_TAG = re.compile(r"^tag\.([A-Za-z][A-Za-z0-9]{0,63})$")
# Search filters shared by studies, series and instances: param -> column.
_EQUALS = {"patient_id": "i.patient_id", "accession": "i.accession_number", "modality": "i.modality",
           "calling_ae": "i.calling_ae"}
_SEARCH_PARAMS = {*_EQUALS, "date_from", "date_to", "study_uid", "limit"}


def _check_params(request: web.Request, allowed: set[str]) -> None:
    """Unknown parameters are an error, not silently ignored (a typo must not widen a search)."""
    for key in request.query:
        if key not in allowed and not _TAG.match(key):
            raise _bad(f"unknown query parameter {key!r}; allowed: {', '.join(sorted(allowed))}, tag.<Keyword>")
        if len(request.query.getall(key)) > 1:
            raise _bad(f"query parameter {key!r} given more than once")


def _search_filters(request: web.Request, allowed: set[str]) -> tuple[list[str], list[Any]]:
    """WHERE clauses for the header filters every search understands, plus tag.<Keyword> extra tags."""
    _check_params(request, allowed)
    q = request.query
    where: list[str] = []
    params: list[Any] = []
    for key, column in _EQUALS.items():
        if key in q:
            where.append(f"{column} = ?")
            params.append(q[key])
    for key, op in (("date_from", ">="), ("date_to", "<=")):
        if key in q:
            if not _DATE.match(q[key]):
                raise _bad(f"{key} must be YYYYMMDD")
            where.append(f"i.study_date {op} ?")
            params.append(q[key])
    for key, column in (("study_uid", "i.study_instance_uid"), ("series_uid", "i.series_instance_uid")):
        if key in q:
            where.append(f"{column} = ?")
            params.append(_uid(q[key], key))
    for key, value in q.items():
        m = _TAG.match(key)
        if m:
            where.append("json_extract_string(i.extra_tags, ?) = ?")
            params += [f"$.{m.group(1)}", value]
    return where, params


def _where(where: list[str]) -> str:
    return " WHERE " + " AND ".join(where) if where else ""


async def studies(request: web.Request) -> web.Response:
    where, params = _search_filters(request, _SEARCH_PARAMS)
    sql = (
        "SELECT i.study_instance_uid, any_value(i.patient_id) AS patient_id, any_value(i.study_date) AS study_date,"
        " any_value(i.accession_number) AS accession_number,"
        " string_agg(DISTINCT i.modality, ',') AS modalities, count(DISTINCT i.series_instance_uid) AS series,"
        " count(DISTINCT i.sop_instance_uid) AS instances,"
        " list(DISTINCT l.node_id) FILTER (WHERE l.node_id IS NOT NULL) AS nodes,"
        " count(*) FILTER (WHERE l.state IN ('forwarded', 'verified')) AS delivered,"
        " count(*) FILTER (WHERE l.state = 'verified') AS verified"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + _where(where)
        + " GROUP BY i.study_instance_uid ORDER BY i.study_instance_uid LIMIT ?"
    )
    return _json(await _query(request, sql, [*params, _limit(request)]))


async def series(request: web.Request) -> web.Response:
    where, params = _search_filters(request, _SEARCH_PARAMS | {"series_uid"})
    sql = (
        "SELECT i.series_instance_uid, any_value(i.study_instance_uid) AS study_instance_uid,"
        " any_value(i.patient_id) AS patient_id, any_value(i.study_date) AS study_date,"
        " any_value(i.modality) AS modality, any_value(i.series_number) AS series_number,"
        " count(DISTINCT i.sop_instance_uid) AS instances,"
        " list(DISTINCT l.node_id) FILTER (WHERE l.node_id IS NOT NULL) AS nodes,"
        " count(*) FILTER (WHERE l.state IN ('forwarded', 'verified')) AS delivered"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + _where(where)
        + " GROUP BY i.series_instance_uid ORDER BY i.series_instance_uid LIMIT ?"
    )
    return _json(await _query(request, sql, [*params, _limit(request)]))


_STATES = set(LOCATION_STATES)


async def instances(request: web.Request) -> web.Response:
    where, params = _search_filters(request, _SEARCH_PARAMS | {"series_uid", "node", "state"})
    q = request.query
    if "node" in q:
        where.append("l.node_id = ?")
        params.append(q["node"])
    if "state" in q:
        if q["state"] not in _STATES:
            raise _bad(f"state must be one of {', '.join(sorted(_STATES))}")
        where.append("l.state = ?")
        params.append(q["state"])
    sql = (
        "SELECT i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid, i.sop_class_uid,"
        " i.transfer_syntax_uid, i.modality, i.patient_id, i.accession_number, i.study_date, i.calling_ae,"
        " i.size, i.dataset_digest, i.received_seq, i.received_at, CAST(i.extra_tags AS VARCHAR) AS extra_tags,"
        " l.node_id, l.state, l.reason, l.detail, l.pool"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + _where(where)
        + " ORDER BY i.received_seq LIMIT ?"
    )
    rows = await _query(request, sql, [*params, _limit(request)])
    for row in rows:
        row["extra_tags"] = json.loads(row["extra_tags"]) if row["extra_tags"] else {}
    return _json(rows)


def _trail_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One event of a trail: who, when, which node, why, verified."""
    payload = json.loads(row["payload"])
    entry = {"seq": row["seq"], "type": row["type"], "at": row["occurred_at"], "node_id": row["node_id"],
             "sop_instance_uid": row["sop_instance_uid"], "event_id": payload.get("event_id")}
    kind = row["type"]
    if kind.startswith("instance.received."):
        entry["calling_ae"] = payload.get("calling_ae", "")
        entry["called_ae"] = payload.get("called_ae", "")
    elif kind.startswith("instance.placed."):
        entry["why"] = {"reason": payload.get("reason"), "candidates": payload.get("candidates", []),
                        "attempt": payload.get("attempt", 0), "rule": payload.get("rule", ""),
                        "pool": payload.get("pool", "")}
    elif kind.startswith(("instance.forward_failed.", "instance.dead_lettered.")):
        entry["why"] = {"reason": payload.get("reason"), "permanent": payload.get("permanent")}
    elif kind.startswith("instance.verification_failed."):
        entry["why"] = {"reason": payload.get("reason"), "expected_digest": payload.get("expected_digest"),
                        "found_digest": payload.get("found_digest")}
    elif kind.startswith("instance.forwarded."):
        entry["status"] = payload.get("status")
        entry["duration_ms"] = payload.get("duration_ms")
    entry["verified"] = kind.startswith("instance.verified.")
    return entry


_TRAIL_SQL = ("SELECT seq, type, node_id, sop_instance_uid, occurred_at, CAST(payload AS VARCHAR) AS payload"
              " FROM events WHERE {} ORDER BY seq")
_SUMMARY_SQL = ("SELECT i.sop_instance_uid, i.study_instance_uid, i.calling_ae, i.received_at, i.versions,"
                " l.node_id, l.state, l.reason, l.detail, l.pool"
                " FROM instances i LEFT JOIN locations l USING (sop_instance_uid) WHERE {}"
                " ORDER BY i.received_seq")


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "verified": row["state"] == "verified"}


def _not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": f"no such {what}"}), content_type="application/json")


async def trail(request: web.Request) -> web.Response:
    _check_params(request, set())
    uid = _uid(request.match_info["uid"], "SOP Instance UID")
    rows = await _query(request, _TRAIL_SQL.format("sop_instance_uid = ?"), [uid])
    if not rows:
        raise _not_found("instance")
    summary = await _query(request, _SUMMARY_SQL.format("i.sop_instance_uid = ?"), [uid])
    return _json({"instance": _summary(summary[0]) if summary else None,
                  "events": [_trail_entry(r) for r in rows]})


async def study_trail(request: web.Request) -> web.Response:
    _check_params(request, set())
    uid = _uid(request.match_info["uid"], "Study Instance UID")
    # Verified events carry no study UID: take them through the study's instances.
    rows = await _query(request, _TRAIL_SQL.format(
        "study_instance_uid = ? OR sop_instance_uid IN "
        "(SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?)"), [uid, uid])
    if not rows:
        raise _not_found("study")
    summary = await _query(request, _SUMMARY_SQL.format("i.study_instance_uid = ?"), [uid])
    return _json({"study_instance_uid": uid, "instances": [_summary(r) for r in summary],
                  "events": [_trail_entry(r) for r in rows]})


async def nodes(request: web.Request) -> web.Response:
    _check_params(request, set())
    configured = request.app[NODES_KEY]
    loads = request.app[LOADS_KEY]
    states = {r["node_id"]: r for r in await _query(
        request, "SELECT node_id, state, reason, updated_at FROM nodes", [])}
    counts: dict[str, dict[str, int]] = {}
    for r in await _query(request, "SELECT node_id, state, count(*) AS n FROM locations GROUP BY ALL", []):
        counts.setdefault(r["node_id"], {})[r["state"]] = r["n"]
    out = []
    for node_id in sorted({*configured, *states, *counts, *loads}):
        state = states.get(node_id)
        out.append({
            "node_id": node_id, "configured": node_id in configured,
            "state": state["state"] if state else None, "state_reason": state["reason"] if state else None,
            "load": loads.get(node_id), "instances": counts.get(node_id, {}),
        })
    return _json(out)


async def totals(request: web.Request) -> web.Response:
    _check_params(request, set())
    rows = await _query(
        request,
        "SELECT (SELECT count(*) FROM instances) AS instances,"
        " (SELECT count(DISTINCT study_instance_uid) FROM instances) AS studies,"
        " (SELECT count(DISTINCT series_instance_uid) FROM instances) AS series,"
        " (SELECT count(DISTINCT patient_id) FROM instances) AS patients,"
        " (SELECT coalesce(sum(size), 0) FROM instances) AS bytes,"
        " (SELECT count(*) FROM events) AS events,"
        " (SELECT last_seq FROM projection_state WHERE name = 'catalog') AS last_seq",
        [],
    )
    states = await _query(request, "SELECT state, count(*) AS n FROM locations GROUP BY state ORDER BY state", [])
    return _json({**rows[0], "locations": {r["state"]: r["n"] for r in states}})


def build_app(store: CatalogStore, token: str, loads: dict | None = None,
              node_ids: tuple[str, ...] = ()) -> web.Application:
    app = web.Application(middlewares=[auth])
    app[STORE_KEY] = store
    app[TOKEN_KEY] = token
    app[LOADS_KEY] = loads if loads is not None else {}
    app[NODES_KEY] = tuple(node_ids)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/studies", studies)
    app.router.add_get("/api/instances", instances)
    app.router.add_get("/api/series", series)
    app.router.add_get("/api/instances/{uid}/trail", trail)
    app.router.add_get("/api/studies/{uid}/trail", study_trail)
    app.router.add_get("/api/nodes", nodes)
    app.router.add_get("/api/totals", totals)
    return app
