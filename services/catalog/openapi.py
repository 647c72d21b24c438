"""The OpenAPI 3.1 document of the catalog's HTTP API, served at /api/openapi.json (and /api/docs as a page).

Written by hand beside the routes (services/catalog/api.py, actions.py);
tests/integration/test_openapi.py validates it and calls every route it lists,
so a route that drifts from its description fails there.
"""

from __future__ import annotations

from typing import Any

from shared.events import LocationState

VERSION = "1.0.0"

_ERR = {"$ref": "#/components/responses/Error"}
_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_INT = {"type": "integer"}
_NINT = {"type": ["integer", "null"]}
_NNUM = {"type": ["number", "null"]}


def _q(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema or _STR}


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _STR}


_SEARCH = [
    _q("patient_id", "Patient ID (operators, or viewers with catalog.viewer_sees_patient_data)"),
    _q("accession", "Accession number (as patient_id)"),
    _q("modality", "Modality, exact"),
    _q("calling_ae", "The sender's AE title, exact"),
    _q("date_from", "Study date from, YYYYMMDD", type="string", pattern=r"^\d{8}$"),
    _q("date_to", "Study date to, YYYYMMDD", type="string", pattern=r"^\d{8}$"),
    _q("study_uid", "Study Instance UID"),
    _q("limit", "Rows, 1-10000 (default 1000)", type="integer", minimum=1, maximum=10000),
]


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _get(
    summary: str, schema: dict[str, Any], params: list[dict[str, Any]] | None = None, **more: Any
) -> dict[str, Any]:
    responses = {"200": _ok(schema), "400": _ERR, "401": _ERR, **more}
    return {"summary": summary, "parameters": params or [], "responses": responses, "x-roles": ["viewer", "operator"]}


def _action(summary: str, body: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "summary": summary,
        "description": "An operator action, recorded as an event on the log (who, when, why). With a console "
        "session cookie the CSRF token is required (form field csrf or header X-CSRF-Token).",
        "parameters": [],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body},
                "application/x-www-form-urlencoded": {"schema": body},
            },
        },
        "responses": {
            "202": _ok({"$ref": "#/components/schemas/Recorded"}, "Recorded on the log"),
            "303": {"description": "Form posts with a local `next`: back to that page"},
            "400": _ERR,
            "401": _ERR,
            "403": _ERR,
            "503": _ERR,
            **(extra or {}),
        },
        "x-roles": ["operator"],
    }


def _reasoned(**props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["reason", *[k for k, v in props.items() if v.pop("x-required", False)]],
        "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 500}, **props},
    }


def document() -> dict[str, Any]:
    node = {
        "type": "object",
        "required": ["node_id", "configured", "state", "load", "instances"],
        "properties": {
            "node_id": _STR,
            "configured": {"type": "boolean"},
            "state": {
                "type": ["string", "null"],
                "description": "active, drained, down or removed (membership, as `switchyard nodes list`)",
            },
            "state_reason": _NSTR,
            "load": {
                "type": ["object", "null"],
                "description": "The latest heartbeat; disk_free_bytes and cpu_percent are null when the node "
                "does not expose them",
                "properties": {
                    "disk_free_bytes": _NINT,
                    "cpu_percent": _NNUM,
                    "rtt_ms": _NNUM,
                    "up": {"type": "boolean"},
                },
            },
            "instances": {"type": "object", "additionalProperties": _INT},
        },
    }
    trail_event = {
        "type": "object",
        "required": ["seq", "type", "at", "node_id", "sop_instance_uid", "verified", "trace_id"],
        "properties": {
            "seq": _INT,
            "type": _STR,
            "at": _STR,
            "node_id": _NSTR,
            "sop_instance_uid": _NSTR,
            "verified": {"type": "boolean"},
            "trace_id": _NSTR,
            "actor": _STR,
            "why": {"type": "object"},
        },
    }
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness (no token needed)",
                "security": [],
                "parameters": [],
                "responses": {"200": _ok({"type": "object", "required": ["ok", "last_seq"]})},
                "x-roles": ["anyone"],
            }
        },
        "/api/overview": {
            "get": _get(
                "What the console's overview shows and `switchyard status` prints",
                {"$ref": "#/components/schemas/Overview"},
            )
        },
        "/api/studies": {"get": _get("Studies matching the filters", _list({"type": "object"}), _SEARCH)},
        "/api/series": {
            "get": _get(
                "Series matching the filters", _list({"type": "object"}), [*_SEARCH, _q("series_uid", "Series UID")]
            )
        },
        "/api/instances": {
            "get": _get(
                "Instances with their location (node, state)",
                _list({"type": "object", "required": ["sop_instance_uid", "node_id", "state"]}),
                [
                    *_SEARCH,
                    _q("series_uid", "Series Instance UID"),
                    _q("node", "Node id"),
                    _q("state", "Location state", type="string", enum=[str(s) for s in LocationState]),
                ],
            )
        },
        "/api/instances/{uid}/trail": {
            "get": _get(
                "Every event of one instance: received (from whom), placed (candidates, rule, reason), "
                "forwarded, verified, operator actions",
                {
                    "type": "object",
                    "required": ["instance", "events"],
                    "properties": {"instance": {"type": ["object", "null"]}, "events": _list(trail_event)},
                },
                [_path("uid", "SOP Instance UID")],
                **{"404": _ERR},
            )
        },
        "/api/studies/{uid}/trail": {
            "get": _get(
                "Every event of one study's instances",
                {
                    "type": "object",
                    "required": ["study_instance_uid", "instances", "events"],
                    "properties": {"instances": _list({"type": "object"}), "events": _list(trail_event)},
                },
                [_path("uid", "Study Instance UID")],
                **{"404": _ERR},
            )
        },
        "/api/nodes": {
            "get": _get("Nodes: membership state, latest heartbeat, instances per location state", _list(node)),
            "post": _action(
                "Add a node (node.state_changed.v1 added)",
                _reasoned(
                    node_id={"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "x-required": True},
                    host=_STR,
                    dicom_port={"type": "string", "description": "1-65535", "x-required": True},
                    ae_title={"type": "string", "x-required": True},
                    rest_url={"type": "string", "x-required": True},
                    username=_STR,
                ),
                {"409": _ERR},
            ),
        },
        "/api/nodes/{node_id}/{action}": {
            "post": {
                **_action("Drain, undrain or remove a node (node.state_changed.v1)", _reasoned(), {"404": _ERR}),
                "parameters": [
                    _path("node_id", "Node id"),
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["drain", "undrain", "remove"]},
                    },
                ],
            }
        },
        "/api/totals": {
            "get": _get("Counts of instances, studies, series, events; locations by state", {"type": "object"})
        },
        "/api/dead-letters": {
            "get": _get(
                "Open dead letters (not placed again, not cancelled)",
                _list(
                    {
                        "type": "object",
                        "required": ["sop_instance_uid", "node_id", "pool", "placement_id", "reason", "final"],
                    }
                ),
            )
        },
        "/api/dead-letters/{uid}/retry": {
            "post": {
                **_action(
                    "Place a dead letter again (instance.retry_requested.v1): to `node` if active, else the "
                    "scheduler's choice; attempts reset",
                    _reasoned(node={"type": "string", "description": '"": the scheduler\'s choice'}, pool=_STR),
                    {"409": _ERR},
                ),
                "parameters": [_path("uid", "SOP Instance UID")],
            }
        },
        "/api/dead-letters/{uid}/cancel": {
            "post": {
                **_action(
                    "Close a dead letter without delivering it (instance.dead_letter_cancelled.v1)",
                    _reasoned(pool=_STR),
                    {"409": _ERR},
                ),
                "parameters": [_path("uid", "SOP Instance UID")],
            }
        },
        "/api/routing/rules": {
            "get": _get(
                "The routing rules in force (the latest on the log, else the config's) as a TOML document",
                {
                    "type": "object",
                    "required": ["source", "document"],
                    "properties": {"source": {"enum": ["log", "config"]}},
                },
            ),
            "post": _action(
                "Replace the routing rules (routing.rules_changed.v1); every scheduler applies the latest",
                _reasoned(document={"type": "string", "x-required": True}),
                {"413": _ERR},
            ),
        },
        "/api/openapi.json": {"get": _get("This document", {"type": "object", "required": ["openapi", "paths"]})},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Switchyard catalog API",
            "version": VERSION,
            "description": "The audit memory of the DICOM router and its operator actions. Viewers see no patient "
            "fields (names, IDs, birth dates, accession numbers) unless catalog.viewer_sees_patient_data.",
        },
        "security": [{"bearer": []}, {"session": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A catalog token (catalog.tokens)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "switchyard_session"},
            },
            "responses": {
                "Error": {
                    "description": "Refused, with the reason",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": _STR}},
                "Recorded": {
                    "type": "object",
                    "required": ["action", "event_id"],
                    "properties": {"action": _STR, "event_id": _STR},
                },
                "Overview": {
                    "type": "object",
                    "required": [
                        "generated_at",
                        "nodes",
                        "pipeline_per_minute",
                        "catalog",
                        "consumers",
                        "totals",
                        "dead_letters",
                        "verification_failures",
                        "recent",
                    ],
                    "properties": {
                        "nodes": _list(node),
                        "pipeline_per_minute": {"type": "object", "additionalProperties": _INT},
                        "catalog": {"type": "object", "required": ["last_seq", "log_last_seq", "lag"]},
                        "consumers": {
                            "type": ["array", "null"],
                            "description": "Lag of the scheduler's durables and each member's forwarder-<node>"
                            " durable (asked of NATS at most every 2 s); null: NATS did not answer; a durable not"
                            " created yet has present false and null counts",
                            "items": {
                                "type": "object",
                                "required": ["durable", "present", "num_pending", "num_ack_pending", "num_redelivered"],
                                "properties": {
                                    "durable": _STR,
                                    "present": {"type": "boolean"},
                                    "num_pending": _NINT,
                                    "num_ack_pending": _NINT,
                                    "num_redelivered": _NINT,
                                },
                            },
                        },
                        "dead_letters": _INT,
                        "verification_failures": _INT,
                        "recent": _list({"type": "object"}),
                    },
                },
            },
        },
    }
