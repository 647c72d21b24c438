"""The catalog's HTTP API: JSON, bearer tokens with roles (services/catalog/auth.py), clear 4xx on bad queries.

Query results contain patient values (this is the audit memory) for operators
only, unless catalog.viewer_sees_patient_data; a viewer may not search by them
either (a search is an oracle). Request logs carry only paths without query
strings, and never the values.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from services.catalog import actions, console, openapi
from services.catalog.actions import POOL_KEY
from services.catalog.auth import (
    BODY_TIMEOUT_KEY,
    TOKENS_KEY,
    VIEWER_SEES_PATIENT_KEY,
    AccessLogger,
    TokenTable,
    authenticate,
    http_logger,
    sees_patient_data,
)
from shared import membership
from shared.config import CatalogConfig, RoutingConfig
from shared.events import LocationState
from shared.readmodel.catalog import LOCATION_STATES, CatalogStore

# Delivered: the node has it (verified or not yet judged); SQL literals from the contract enum.
_DELIVERED = ", ".join(f"'{s}'" for s in (LocationState.FORWARDED, LocationState.VERIFIED))

_DATE = re.compile(r"^\d{8}$")
_UID = re.compile(r"^[0-9.]{1,64}$")
MAX_LIMIT = 10000
log = logging.getLogger("switchyard.catalog")

STORE_KEY = web.AppKey("store", CatalogStore)
# Latest heartbeat per node (filled by the service from the HEARTBEATS stream).
LOADS_KEY = web.AppKey("loads", dict)
NODES_KEY = web.AppKey("nodes", tuple)
STREAM_INFO_KEY = web.AppKey("stream_last_seq", object)  # async () -> int | None
# async () -> {durable: {num_pending, num_ack_pending, num_redelivered} | None (absent)}
CONSUMER_LAG_KEY = web.AppKey("consumer_lag", object)
CONSUMER_LAG_CACHE_KEY = web.AppKey("consumer_lag_cache", dict)
CONSUMER_LAG_TTL_S = 2.0  # the page polls every 5 s, and several browsers may be open


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


# Patient-identifying result columns, and extra-tag keywords treated as such (PatientName,
# OtherPatientIDs, IssuerOfPatientID, AccessionNumber, ...): operators only by default.
PATIENT_COLUMNS = frozenset({"patient_id", "patient_name", "patient_birth_date", "accession_number"})
_PATIENT_PARAMS = frozenset({"patient_id", "accession"})
_PATIENT_KEYWORD = re.compile(r"Patient|Accession")


def _forbidden(message: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=json.dumps({"error": message}), content_type="application/json")


def _masked(request: web.Request, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without patient fields for callers who may not see them (the keys are left out)."""
    if sees_patient_data(request):
        return rows
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k not in PATIENT_COLUMNS}
        if isinstance(row.get("extra_tags"), dict):
            row["extra_tags"] = {k: v for k, v in row["extra_tags"].items() if not _PATIENT_KEYWORD.search(k)}
        out.append(row)
    return out


async def _query(request: web.Request, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    return await asyncio.to_thread(request.app[STORE_KEY].rows, sql, params)


def _json(rows: Any) -> web.Response:
    return web.json_response(rows, dumps=lambda o: json.dumps(o, default=str))


async def healthz(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    return web.json_response({"ok": True, "last_seq": await asyncio.to_thread(store.last_seq)})


_TAG = re.compile(r"^tag\.([A-Za-z][A-Za-z0-9]{0,63})$")
# Search filters shared by studies, series and instances: param -> column.
_EQUALS = {
    "patient_id": "i.patient_id",
    "accession": "i.accession_number",
    "modality": "i.modality",
    "calling_ae": "i.calling_ae",
}
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
    if not sees_patient_data(request):
        for key in q:
            m = _TAG.match(key)
            if key in _PATIENT_PARAMS or (m and _PATIENT_KEYWORD.search(m.group(1))):
                raise _forbidden(f"searching by {key!r} needs access to patient data (operator role)")
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
        f" count(*) FILTER (WHERE l.state IN ({_DELIVERED})) AS delivered,"
        f" count(*) FILTER (WHERE l.state = '{LocationState.VERIFIED}') AS verified"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + _where(where)
        + " GROUP BY i.study_instance_uid ORDER BY i.study_instance_uid LIMIT ?"
    )
    return _json(_masked(request, await _query(request, sql, [*params, _limit(request)])))


async def series(request: web.Request) -> web.Response:
    where, params = _search_filters(request, _SEARCH_PARAMS | {"series_uid"})
    sql = (
        "SELECT i.series_instance_uid, any_value(i.study_instance_uid) AS study_instance_uid,"
        " any_value(i.patient_id) AS patient_id, any_value(i.study_date) AS study_date,"
        " any_value(i.modality) AS modality, any_value(i.series_number) AS series_number,"
        " count(DISTINCT i.sop_instance_uid) AS instances,"
        " list(DISTINCT l.node_id) FILTER (WHERE l.node_id IS NOT NULL) AS nodes,"
        f" count(*) FILTER (WHERE l.state IN ({_DELIVERED})) AS delivered"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + _where(where)
        + " GROUP BY i.series_instance_uid ORDER BY i.series_instance_uid LIMIT ?"
    )
    return _json(_masked(request, await _query(request, sql, [*params, _limit(request)])))


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
        " i.called_ae, i.peer_address, i.peer_port,"
        " i.size, i.dataset_digest, i.received_seq, i.received_at, CAST(i.extra_tags AS VARCHAR) AS extra_tags,"
        " l.node_id, l.state, l.reason, l.detail, l.pool"
        " FROM instances i LEFT JOIN locations l USING (sop_instance_uid)"
        + _where(where)
        + " ORDER BY i.received_seq LIMIT ?"
    )
    rows = await _query(request, sql, [*params, _limit(request)])
    for row in rows:
        row["extra_tags"] = json.loads(row["extra_tags"]) if row["extra_tags"] else {}
    return _json(_masked(request, rows))


def _trail_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One event of a trail: who, when, which node, why, verified."""
    payload = json.loads(row["payload"])
    entry = {
        "seq": row["seq"],
        "type": row["type"],
        "at": row["occurred_at"],
        "node_id": row["node_id"],
        "sop_instance_uid": row["sop_instance_uid"],
        "event_id": payload.get("event_id"),
    }
    kind = row["type"]
    if kind.startswith(("instance.received.", "instance.resent.")):  # who sent it: AE titles, the peer's address
        entry["calling_ae"] = payload.get("calling_ae", "")
        entry["called_ae"] = payload.get("called_ae", "")
        entry["peer_address"] = payload.get("peer_address", "")
        entry["peer_port"] = payload.get("peer_port", 0)
        if kind.startswith("instance.resent."):
            entry["association_id"] = payload.get("association_id", "")
            entry["same_content"] = payload.get("same_content", True)
    elif kind.startswith("instance.placed."):
        entry["why"] = {
            "reason": payload.get("reason"),
            "candidates": payload.get("candidates", []),
            "attempt": payload.get("attempt", 0),
            "rule": payload.get("rule", ""),
            "pool": payload.get("pool", ""),
        }
    elif kind.startswith(("instance.forward_failed.", "instance.dead_lettered.")):
        entry["why"] = {"reason": payload.get("reason"), "permanent": payload.get("permanent")}
    elif kind.startswith("instance.verification_failed."):
        entry["why"] = {
            "reason": payload.get("reason"),
            "expected_digest": payload.get("expected_digest"),
            "found_digest": payload.get("found_digest"),
        }
    elif kind.startswith("instance.forwarded."):
        entry["status"] = payload.get("status")
        entry["duration_ms"] = payload.get("duration_ms")
    elif kind.startswith(("instance.retry_requested.", "instance.dead_letter_cancelled.")):
        # Operator actions (the console): who asked, why, and for a retry the chosen node ("" = scheduler's).
        entry["actor"] = payload.get("actor", "")
        entry["why"] = {"reason": payload.get("reason", ""), "placement_id": payload.get("placement_id", "")}
    entry["verified"] = kind.startswith("instance.verified.")
    parts = str(payload.get("traceparent") or "").split("-")
    entry["trace_id"] = parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None
    return entry


_TRAIL_SQL = (
    "SELECT seq, type, node_id, sop_instance_uid, occurred_at, CAST(payload AS VARCHAR) AS payload"
    " FROM events WHERE {} ORDER BY seq"
)
_SUMMARY_SQL = (
    "SELECT i.sop_instance_uid, i.study_instance_uid, i.calling_ae, i.peer_address, i.peer_port,"
    " i.received_at, i.versions, l.node_id, l.state,"
    " l.reason, l.detail, l.pool FROM instances i LEFT JOIN locations l USING (sop_instance_uid) WHERE {}"
    " ORDER BY i.received_seq"
)


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
    return _json({"instance": _summary(summary[0]) if summary else None, "events": [_trail_entry(r) for r in rows]})


async def study_trail(request: web.Request) -> web.Response:
    _check_params(request, set())
    uid = _uid(request.match_info["uid"], "Study Instance UID")
    # Verified events carry no study UID: take them through the study's instances.
    rows = await _query(
        request,
        _TRAIL_SQL.format(
            "study_instance_uid = ? OR sop_instance_uid IN "
            "(SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?)"
        ),
        [uid, uid],
    )
    if not rows:
        raise _not_found("study")
    summary = await _query(request, _SUMMARY_SQL.format("i.study_instance_uid = ?"), [uid])
    return _json(
        {
            "study_instance_uid": uid,
            "instances": [_summary(r) for r in summary],
            "events": [_trail_entry(r) for r in rows],
        }
    )


def _membership(request: web.Request) -> dict[str, str]:
    """Node id -> state as the services see it (shared.membership: "active", drained, down, removed)."""
    pool = request.app[POOL_KEY]
    if not isinstance(pool, membership.Pool):
        return {}
    return {node_id: str(m.state) for node_id, m in pool.members.items()}


async def node_rows(request: web.Request) -> list[dict[str, Any]]:
    configured = request.app[NODES_KEY]
    loads = request.app[LOADS_KEY]
    states = {
        r["node_id"]: r for r in await _query(request, "SELECT node_id, state, reason, updated_at FROM nodes", [])
    }
    counts: dict[str, dict[str, int]] = {}
    for r in await _query(request, "SELECT node_id, state, count(*) AS n FROM locations GROUP BY ALL", []):
        counts.setdefault(r["node_id"], {})[r["state"]] = r["n"]
    members = _membership(request)
    out = []
    for node_id in sorted({*configured, *states, *counts, *loads, *members}):
        state = states.get(node_id)
        # The membership's state (what `switchyard nodes list` says); without one, a configured
        # node no event ever changed is active, as the services take it.
        current = members.get(node_id) or (state["state"] if state else ("active" if node_id in configured else None))
        out.append(
            {
                "node_id": node_id,
                "configured": node_id in configured,
                "state": current,
                "state_reason": state["reason"] if state else None,
                "load": loads.get(node_id),
                "instances": counts.get(node_id, {}),
            }
        )
    return out


async def nodes(request: web.Request) -> web.Response:
    _check_params(request, set())
    return _json(await node_rows(request))


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


async def consumer_lag(request: web.Request) -> list[dict[str, Any]] | None:
    """Each durable's lag, asked of NATS at most every CONSUMER_LAG_TTL_S (one request at a time).

    None: unknown (no NATS, or it did not answer); a durable not created yet is ``present: false``.
    """
    collect = request.app[CONSUMER_LAG_KEY]
    if collect is None:
        return None
    cache = request.app[CONSUMER_LAG_CACHE_KEY]
    async with cache["lock"]:
        loop = asyncio.get_running_loop()
        if cache["at"] is not None and loop.time() - cache["at"] < CONSUMER_LAG_TTL_S:
            return cache["value"]  # type: ignore[no-any-return]
        try:
            found = await asyncio.wait_for(collect(), 2.0)  # type: ignore[operator]
            value: list[dict[str, Any]] | None = [
                {"durable": name, "present": lag is not None, **(lag or dict.fromkeys(LAG_FIELDS))}
                for name, lag in found.items()
            ]
        except Exception as exc:  # noqa: BLE001 - lag is best effort: unknown rather than an error page
            log.warning("consumer lag unknown (%s)", type(exc).__name__)
            value = None
        cache.update(at=loop.time(), value=value)
        return value


LAG_FIELDS = ("num_pending", "num_ack_pending", "num_redelivered")


async def overview_data(request: web.Request) -> dict[str, Any]:
    """What the console's overview shows and `switchyard status` prints (no patient fields)."""
    q = functools.partial(_query, request)
    nodes_ = await node_rows(request)
    now = datetime.now(UTC).replace(tzinfo=None)
    minute = now - timedelta(seconds=60)
    per_node = {
        r["node_id"]: r
        for r in await q(
            "SELECT node_id,"
            " count(*) FILTER (WHERE type = 'instance.placed.v1') AS placed,"
            " count(*) FILTER (WHERE type = 'instance.verified.v1') AS verified,"
            " count(*) FILTER (WHERE type = 'instance.verification_failed.v1') AS verification_failed"
            " FROM events WHERE occurred_at >= ? AND node_id IS NOT NULL GROUP BY node_id",
            [minute],
        )
    }
    scores: dict[str, float] = {}
    last_placed = await q(
        "SELECT CAST(payload AS VARCHAR) AS payload FROM events WHERE type = 'instance.placed.v1'"
        " ORDER BY seq DESC LIMIT 1",
        [],
    )
    if last_placed:
        for c in json.loads(last_placed[0]["payload"]).get("candidates", []):
            scores[c["node_id"]] = c["score"]
    for n in nodes_:
        recent = per_node.get(n["node_id"], {})
        load = n["load"] or {}
        verified, failed = recent.get("verified", 0), recent.get("verification_failed", 0)
        n.update(
            last_heartbeat=load.get("occurred_at"),
            up=load.get("up"),
            score=scores.get(n["node_id"]),
            placements_per_minute=recent.get("placed", 0),
            forward_queue=n["instances"].get(LocationState.PLACED, 0) + n["instances"].get(LocationState.FAILED, 0),
            verified_per_minute=verified,
            verified_rate=round(verified / (verified + failed), 4) if verified + failed else None,
        )
    stages = await q(
        "SELECT type, count(*) AS n FROM events WHERE occurred_at >= ? AND type LIKE 'instance.%' GROUP BY type",
        [minute],
    )
    totals_ = (
        await q(
            "SELECT (SELECT count(*) FROM instances) AS instances,"
            " (SELECT count(DISTINCT study_instance_uid) FROM instances) AS studies,"
            " (SELECT count(*) FROM locations WHERE state = 'verification_failed') AS verification_failures,"
            f" (SELECT count(*) FROM locations WHERE state = '{LocationState.DEAD_LETTERED}') AS dead_letters",
            [],
        )
    )[0]
    latest = await q(
        "SELECT seq, type, occurred_at AS at, node_id, sop_instance_uid, study_instance_uid FROM events"
        " ORDER BY seq DESC LIMIT 15",
        [],
    )
    last_seq = await asyncio.to_thread(request.app[STORE_KEY].last_seq)
    log_last = None
    stream_info = request.app[STREAM_INFO_KEY]
    if stream_info is not None:
        try:
            log_last = await asyncio.wait_for(stream_info(), 2.0)  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - lag is best effort: unknown rather than an error page
            log_last = None
    return {
        "generated_at": now.isoformat() + "Z",
        "nodes": nodes_,
        "pipeline_per_minute": {r["type"].split(".")[1]: r["n"] for r in stages},
        "catalog": {
            "last_seq": last_seq,
            "log_last_seq": log_last,
            "lag": None if log_last is None else max(0, log_last - last_seq),
        },
        "consumers": await consumer_lag(request),
        "totals": totals_,
        "dead_letters": totals_["dead_letters"],
        "verification_failures": totals_["verification_failures"],
        "recent": latest,
    }


async def overview(request: web.Request) -> web.Response:
    _check_params(request, set())
    return _json(await overview_data(request))


async def dead_letters(request: web.Request) -> web.Response:
    _check_params(request, set())
    return _json(await actions.open_dead_letters(request))


async def openapi_json(request: web.Request) -> web.Response:
    return _json(openapi.document())


def build_app(
    store: CatalogStore,
    catalog: CatalogConfig,
    loads: dict | None = None,
    node_ids: tuple[str, ...] = (),
    *,
    publish: actions.Publish | None = None,
    pool: membership.Pool | None = None,
    routing: RoutingConfig | None = None,
    stream_last_seq: Callable[[], Awaitable[int]] | None = None,
    trace_url_template: str = "",
    consumer_lag: Callable[[], Awaitable[dict[str, dict[str, int] | None]]] | None = None,
) -> web.Application:
    """The API and the console. ``publish`` records operator actions (None: actions answer 503);
    ``pool`` is the live membership; ``stream_last_seq`` gives the log's last sequence (lag);
    ``consumer_lag`` each durable's lag (None: absent)."""
    app = web.Application(middlewares=[console.session_middleware, authenticate])
    app[STORE_KEY] = store
    app[TOKENS_KEY] = TokenTable.from_config(catalog)
    app[BODY_TIMEOUT_KEY] = catalog.body_timeout_s
    app[VIEWER_SEES_PATIENT_KEY] = catalog.viewer_sees_patient_data
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
    app[actions.PUBLISH_KEY] = publish
    app[POOL_KEY] = pool
    app[actions.ROUTING_KEY] = routing or RoutingConfig()
    app[STREAM_INFO_KEY] = stream_last_seq
    app[CONSUMER_LAG_KEY] = consumer_lag
    app[CONSUMER_LAG_CACHE_KEY] = {"lock": asyncio.Lock(), "at": None, "value": None}
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/dead-letters", dead_letters)
    app.router.add_post("/api/dead-letters/{uid}/retry", actions.retry)
    app.router.add_post("/api/dead-letters/{uid}/cancel", actions.cancel)
    app.router.add_post("/api/nodes", actions.node_add)
    app.router.add_post("/api/nodes/{node_id}/{action}", actions.node_action)
    app.router.add_get("/api/routing/rules", actions.get_rules)
    app.router.add_post("/api/routing/rules", actions.set_rules)
    app.router.add_get("/api/openapi.json", openapi_json)
    console.setup(app, catalog, trace_url_template)
    return app


def runner_options(catalog: CatalogConfig) -> dict[str, Any]:
    """AppRunner options: the header deadline, access log without query strings, filtered error log.

    aiohttp closes a connection whose request headers are not complete
    ``keepalive_timeout`` after it connected or after the last response (its
    keep-alive timer is not reset by incoming bytes), so that timer is the
    header timeout; an idle keep-alive connection goes at the same time.
    """
    return {
        "keepalive_timeout": catalog.header_timeout_s,
        "lingering_time": min(10.0, catalog.body_timeout_s),
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger("switchyard.catalog.access"),
        "logger": http_logger(),
    }


def ssl_context(catalog: CatalogConfig) -> ssl.SSLContext | None:
    """HTTPS only when a certificate and key are configured (TLS 1.2 or later)."""
    if not catalog.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(catalog.tls_cert_file, catalog.tls_key_file)
    return ctx
