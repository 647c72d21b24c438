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

from services.catalog.projection import CatalogStore

_DATE = re.compile(r"^\d{8}$")
_UID = re.compile(r"^[0-9.]{1,64}$")
MAX_LIMIT = 10000

STORE_KEY = web.AppKey("store", CatalogStore)
TOKEN_KEY = web.AppKey("token", str)


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f'{{"error": "{message}"}}', content_type="application/json")


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
    store = request.app[STORE_KEY]

    def run() -> list[dict[str, Any]]:
        cur = store.cursor()
        try:
            rel = cur.execute(sql, params)
            cols = [d[0] for d in rel.description]
            return [dict(zip(cols, row)) for row in rel.fetchall()]
        finally:
            cur.close()

    return await asyncio.to_thread(run)


def _json(rows: Any) -> web.Response:
    return web.json_response(rows, dumps=lambda o: json.dumps(o, default=str))


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    return web.json_response({"ok": True, "last_seq": await asyncio.to_thread(store.last_seq)})


async def studies(request: web.Request) -> web.Response:
    q = request.query
    where, params = [], []
    for key, column in (("patient_id", "i.patient_id"), ("accession", "i.accession_number"),
                        ("modality", "i.modality"), ("calling_ae", "i.calling_ae")):
        if key in q:
            where.append(f"{column} = ?")
            params.append(q[key])
    for key, op in (("date_from", ">="), ("date_to", "<=")):
        if key in q:
            if not _DATE.match(q[key]):
                raise _bad(f"{key} must be YYYYMMDD")
            where.append(f"i.study_date {op} ?")
            params.append(q[key])
    if "study_uid" in q:
        where.append("i.study_instance_uid = ?")
        params.append(_uid(q["study_uid"], "study_uid"))
    sql = (
        "SELECT i.study_instance_uid, any_value(i.patient_id) AS patient_id, any_value(i.study_date) AS study_date,"
        " string_agg(DISTINCT i.modality, ',') AS modalities, count(DISTINCT i.series_instance_uid) AS series,"
        " count(*) AS instances, list(DISTINCT l.node_id) FILTER (WHERE l.node_id IS NOT NULL) AS nodes,"
        " count(*) FILTER (WHERE l.state IN ('forwarded', 'verified')) AS delivered"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " GROUP BY i.study_instance_uid ORDER BY i.study_instance_uid LIMIT ?"
    )
    return _json(await _query(request, sql, [*params, _limit(request)]))


async def instances(request: web.Request) -> web.Response:
    q = request.query
    where, params = [], []
    for key, column in (("study_uid", "i.study_instance_uid"), ("series_uid", "i.series_instance_uid")):
        if key in q:
            where.append(f"{column} = ?")
            params.append(_uid(q[key], key))
    if "node" in q:
        where.append("l.node_id = ?")
        params.append(q["node"])
    if "state" in q:
        where.append("l.state = ?")
        params.append(q["state"])
    sql = (
        "SELECT i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid, i.sop_class_uid,"
        " i.transfer_syntax_uid, i.size, i.dataset_digest, i.received_seq, l.node_id, l.state, l.reason,"
        " l.detail FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY i.received_seq LIMIT ?"
    )
    return _json(await _query(request, sql, [*params, _limit(request)]))


async def trail(request: web.Request) -> web.Response:
    uid = _uid(request.match_info["uid"], "SOP Instance UID")
    rows = await _query(
        request,
        "SELECT seq, type, node_id, occurred_at, payload FROM events WHERE sop_instance_uid = ? ORDER BY seq",
        [uid],
    )
    if not rows:
        raise web.HTTPNotFound(text='{"error": "no such instance"}', content_type="application/json")
    return _json(rows)


async def totals(request: web.Request) -> web.Response:
    rows = await _query(
        request,
        "SELECT (SELECT count(*) FROM instances) AS instances,"
        " (SELECT count(DISTINCT study_instance_uid) FROM instances) AS studies,"
        " (SELECT coalesce(sum(size), 0) FROM instances) AS bytes,"
        " (SELECT count(*) FROM events) AS events,"
        " (SELECT last_seq FROM projection_state WHERE name = 'catalog') AS last_seq",
        [],
    )
    states = await _query(request, "SELECT state, count(*) AS n FROM locations GROUP BY state ORDER BY state", [])
    return _json({**rows[0], "locations": {r["state"]: r["n"] for r in states}})


def build_app(store: CatalogStore, token: str) -> web.Application:
    app = web.Application(middlewares=[auth])
    app[STORE_KEY] = store
    app[TOKEN_KEY] = token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/studies", studies)
    app.router.add_get("/api/instances", instances)
    app.router.add_get("/api/instances/{uid}/trail", trail)
    app.router.add_get("/api/totals", totals)
    return app
