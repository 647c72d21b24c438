"""The console's pages: overview, search, study, instance trail, dead letters, nodes, rules, API docs.

Each page reads through the JSON API's own handlers (same validation, same
masking of patient fields for viewers), then renders with the escaping helper
(console/template.py). Action forms post to the API's action routes with the
session's CSRF token; viewers get no forms at all.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web
from yarl import URL

from services.catalog import actions, api, openapi
from services.catalog.auth import sees_patient_data
from services.catalog.console import (
    COOKIE,
    SESSIONS_KEY,
    TRACE_URL_KEY,
    Session,
    cookie_for,
    cross_site,
)
from services.catalog.console.template import Markup, escape, html, join
from shared.events import LocationState

Api = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def call_api(request: web.Request, handler: Api, path: str, params: dict[str, str] | None = None) -> Any:
    """An API handler's JSON for this caller (its role and masking); API errors propagate as they are."""
    sub = request.clone(rel_url=URL(path).with_query(params or {}))
    resp = await handler(sub)
    assert isinstance(resp, web.Response) and resp.text is not None
    return json.loads(resp.text)


def _operator(request: web.Request) -> bool:
    return request.get("role") == "operator"


def _csrf(request: web.Request) -> Markup:
    session: Session = request["session"]
    return html('<input type="hidden" name="csrf" value="{t}">', t=session.csrf)


NAV = (
    ("/", "Overview"),
    ("/search", "Search"),
    ("/dead-letters", "Dead letters"),
    ("/nodes", "Nodes"),
    ("/rules", "Routing rules"),
    ("/api/docs", "API"),
)


def layout(request: web.Request, title: str, body: Markup, status: int = 200) -> web.Response:
    who = Markup("")
    nav = Markup("")
    if "session" in request:
        links = join(
            html(
                '<li><a href="{href}"{cur}>{label}</a></li>',
                href=href,
                label=label,
                cur=Markup(' aria-current="page"') if request.path == href else Markup(""),
            )
            for href, label in NAV
        )
        nav = html('<nav aria-label="Main"><ul>{links}</ul></nav>', links=links)
        who = html(
            '<form method="post" action="/logout" class="who">{csrf}<span>Signed in as <strong>{name}</strong>'
            ' ({role})</span> <button type="submit">Sign out</button></form>',
            csrf=_csrf(request),
            name=request["principal"],
            role=request["role"],
        )
    done = request.query.get("done", "")
    notice = html('<p class="notice" role="status">Recorded: {d}</p>', d=done.replace("_", " ")) if done else ""
    page = html(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>{title} · Switchyard</title>"
        '<link rel="stylesheet" href="{css}"></head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        '<header><p class="brand">Switchyard</p>{nav}{who}</header>'
        '<main id="main"><h1>{title}</h1>{notice}{body}</main>'
        '<script src="{js}" defer></script></body></html>',
        title=title,
        nav=nav,
        who=who,
        notice=notice,
        body=body,
        css=request.app.router["static"].url_for(filename="console.css"),
        js=request.app.router["static"].url_for(filename="console.js"),
    )
    return web.Response(
        text=page,
        content_type="text/html",
        status=status,
        headers={
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


def error_page(request: web.Request, exc: web.HTTPException) -> web.Response:
    try:
        message = json.loads(exc.text or "{}").get("error", exc.reason)
    except ValueError:
        message = exc.reason
    body = html(
        '<p class="error" role="alert">{m}</p><p><a href="javascript:history.back()">Back</a> · '
        '<a href="/">Overview</a></p>',
        m=message,
    )
    return layout(request, f"{exc.status} {exc.reason}", body, status=exc.status)


def _table(headers: list[str], rows: list[list[Any]], table_id: str = "", caption: str = "") -> Markup:
    head = join(html('<th scope="col">{h}</th>', h=h) for h in headers)
    body = join(html("<tr>{cells}</tr>", cells=join(html("<td>{c}</td>", c=c) for c in row)) for row in rows)
    if not rows:
        body = html('<tr><td colspan="{n}">None.</td></tr>', n=len(headers))
    return html(
        "<table{id}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        id=Markup(f' id="{escape(table_id)}"') if table_id else Markup(""),
        cap=html("<caption>{c}</caption>", c=caption) if caption else "",
        head=head,
        body=body,
    )


def _link(href: str, text: Any) -> Markup:
    return html('<a href="{h}">{t}</a>', h=href, t=text)


def _reason_input(uid: str) -> Markup:
    return html('<label for="{i}">Reason</label><input id="{i}" name="reason" required maxlength="500">', i=uid)


# -- sign in / out -------------------------------------------------------------------


def _next(value: str) -> str:
    return value if value.startswith("/") and not value.startswith("//") else "/"


async def login_get(request: web.Request) -> web.Response:
    return _login_form(request)


def _login_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    body = html(
        '{err}<form method="post" action="/login" class="login">'
        '<input type="hidden" name="next" value="{next}">'
        '<label for="token">Access token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
        '<button type="submit">Sign in</button></form>'
        "<p>The token is one of the catalog's tokens (catalog.tokens); operators may act, viewers only look.</p>",
        err=html('<p class="error" role="alert">{e}</p>', e=error) if error else "",
        next=_next(request.query.get("next", "/")),
    )
    return layout(request, "Sign in", body, status=status)


async def login_post(request: web.Request) -> web.Response:
    if cross_site(request):
        raise web.HTTPForbidden(text='{"error": "cross-site request refused"}', content_type="application/json")
    form = await request.post()
    token = form.get("token")
    principal = None
    if isinstance(token, str) and token:
        try:
            principal = request.app[api.TOKENS_KEY].lookup(token.encode("ascii"))
        except UnicodeEncodeError:
            principal = None
    if principal is None:
        return _login_form(request, "That token is not valid.", status=401)
    session = request.app[SESSIONS_KEY].create(principal.name, principal.role)
    nxt = form.get("next")
    resp = web.HTTPSeeOther(_next(nxt if isinstance(nxt, str) else "/"))
    cookie_for(request, resp, session)
    raise resp


async def logout(request: web.Request) -> web.Response:
    request.app[SESSIONS_KEY].drop(request.cookies.get(COOKIE, ""))
    resp = web.HTTPSeeOther("/login")
    cookie_for(request, resp, None)
    raise resp


# -- overview ------------------------------------------------------------------------


def _num(v: Any, fmt: str = "{}") -> str:
    return "–" if v is None else fmt.format(v)


def _gib(v: Any) -> str:
    return "–" if v is None else f"{v / 2**30:.1f} GiB"


def node_cells(n: dict[str, Any]) -> list[Any]:
    load = n.get("load") or {}
    return [
        n["node_id"],
        n["state"] or "unknown",
        _num(n.get("score"), "{:.3f}"),
        _num(load.get("pending_jobs")),
        _num(load.get("rtt_ms"), "{:.1f} ms"),
        _num(load.get("cpu_percent"), "{:.0f} %"),
        _gib(load.get("disk_free_bytes")),
        n.get("last_heartbeat") or "never",
        n.get("placements_per_minute", 0),
        n.get("forward_queue", 0),
        _num(n.get("verified_rate"), "{:.0%}"),
    ]


NODE_HEADERS = [
    "Node",
    "State",
    "Load score",
    "Pending jobs",
    "Echo RTT",
    "CPU",
    "Disk free",
    "Last heartbeat",
    "Placed/min",
    "Forward queue",
    "Verified rate",
]


LAG_HEADERS = ["Consumer", "Pending", "Awaiting ack", "Redelivered"]


def lag_cells(c: dict[str, Any]) -> list[Any]:
    """One durable's row; one not created yet says so (console.js renders the same)."""
    if not c["present"]:
        return [c["durable"], "absent", "", ""]
    return [c["durable"], c["num_pending"], c["num_ack_pending"], c["num_redelivered"]]


async def overview_page(request: web.Request) -> web.Response:
    data = await api.overview_data(request)
    cat = data["catalog"]
    pipeline = data["pipeline_per_minute"]
    stats = html(
        '<dl class="stats" id="stats">'
        '<div><dt>Instances</dt><dd data-k="instances">{i}</dd></div>'
        '<div><dt>Studies</dt><dd data-k="studies">{s}</dd></div>'
        '<div><dt>Open dead letters</dt><dd data-k="dead_letters"><a href="/dead-letters">{d}</a></dd></div>'
        '<div><dt>Verification failures</dt><dd data-k="verification_failures">{v}</dd></div>'
        '<div><dt>Catalog lag (events)</dt><dd data-k="lag">{lag}</dd></div></dl>',
        i=data["totals"]["instances"],
        s=data["totals"]["studies"],
        d=data["dead_letters"],
        v=data["verification_failures"],
        lag=_num(cat["lag"]),
    )
    stages = ["received", "placed", "forwarded", "verified", "forward_failed", "dead_lettered", "verification_failed"]
    pipe = _table(stages, [[pipeline.get(s, 0) for s in stages]], "pipeline", "Events per stage, last minute")
    nodes = _table(NODE_HEADERS, [node_cells(n) for n in data["nodes"]], "nodes", "Nodes")
    lag = _table(LAG_HEADERS, [lag_cells(c) for c in data["consumers"] or []], "consumers", "Consumer lag")
    recent = _table(
        ["Seq", "When", "Event", "Node", "Instance"],
        [
            [
                r["seq"],
                r["at"],
                r["type"],
                r["node_id"] or "",
                _link(f"/instances/{r['sop_instance_uid']}", r["sop_instance_uid"]) if r["sop_instance_uid"] else "",
            ]
            for r in data["recent"]
        ],
        "recent",
        "Recent activity",
    )
    body = html(
        '<p class="live" aria-live="polite" id="updated">Updated {t}</p>{stats}{nodes}{lag}{pipe}{recent}',
        t=data["generated_at"],
        stats=stats,
        nodes=nodes,
        lag=lag,
        pipe=pipe,
        recent=recent,
    )
    return layout(request, "Overview", body)


# -- search, study, trail ------------------------------------------------------------

SEARCH_FIELDS = (
    ("patient_id", "Patient ID", True),
    ("accession", "Accession number", True),
    ("date_from", "Study date from (YYYYMMDD)", False),
    ("date_to", "Study date to (YYYYMMDD)", False),
    ("modality", "Modality", False),
    ("calling_ae", "Calling AE", False),
    ("node", "Node", False),
)


async def search_page(request: web.Request) -> web.Response:
    patient = sees_patient_data(request)
    q = {k: v.strip() for k, v in request.query.items() if v.strip()}
    inputs = []
    for name, label, is_patient in SEARCH_FIELDS:
        if is_patient and not patient:
            continue
        inputs.append(
            html(
                '<div><label for="f-{n}">{l}</label><input id="f-{n}" name="{n}" value="{v}"></div>',
                n=name,
                l=label,
                v=q.get(name, ""),
            )
        )
    states = join(
        html(
            '<option value="{s}"{sel}>{s}</option>', s=s, sel=Markup(" selected") if q.get("state") == s else Markup("")
        )
        for s in LocationState
    )
    inputs.append(
        html(
            '<div><label for="f-state">State</label><select id="f-state" name="state">'
            '<option value="">any</option>{o}</select></div>',
            o=states,
        )
    )
    form = html(
        '<form method="get" action="/search" class="search" role="search">{i}'
        '<button type="submit">Search</button></form>',
        i=join(inputs),
    )
    results = Markup("")
    if q:
        if "node" in q or "state" in q:
            rows = await call_api(request, api.instances, "/api/instances", {**q, "limit": "500"})
            results = _table(
                ["Instance", "Study", "Modality", "Calling AE", "Node", "State", *(["Patient ID"] if patient else [])],
                [
                    [
                        _link(f"/instances/{r['sop_instance_uid']}", r["sop_instance_uid"]),
                        _link(f"/studies/{r['study_instance_uid']}", r["study_instance_uid"]),
                        r["modality"],
                        r["calling_ae"],
                        r["node_id"] or "",
                        r["state"] or "",
                        *([r.get("patient_id", "")] if patient else []),
                    ]
                    for r in rows
                ],
                "results",
                f"{len(rows)} instances",
            )
        else:
            rows = await call_api(request, api.studies, "/api/studies", {**q, "limit": "500"})
            results = _table(
                [
                    "Study",
                    "Date",
                    "Modalities",
                    "Series",
                    "Instances",
                    "Nodes",
                    "Verified",
                    *(["Patient ID", "Accession"] if patient else []),
                ],
                [
                    [
                        _link(f"/studies/{r['study_instance_uid']}", r["study_instance_uid"]),
                        r["study_date"],
                        r["modalities"],
                        r["series"],
                        r["instances"],
                        ", ".join(r["nodes"] or []),
                        r["verified"],
                        *([r.get("patient_id", ""), r.get("accession_number", "")] if patient else []),
                    ]
                    for r in rows
                ],
                "results",
                f"{len(rows)} studies",
            )
    return layout(request, "Search", html("{f}{r}", f=form, r=results))


async def study_page(request: web.Request) -> web.Response:
    uid = request.match_info["uid"]
    data = await call_api(request, api.study_trail, f"/api/studies/{uid}/trail")
    rows = [
        [
            _link(f"/instances/{i['sop_instance_uid']}", i["sop_instance_uid"]),
            i["node_id"] or "",
            i["state"] or "",
            i["pool"] or "",
            i["calling_ae"],
            i["received_at"],
        ]
        for i in data["instances"]
    ]
    body = html(
        "<p>Study <code>{u}</code>: {n} instances.</p>{t}",
        u=uid,
        n=len(data["instances"]),
        t=_table(["Instance", "Node", "State", "Pool", "Calling AE", "Received"], rows, "instances", "Instances"),
    )
    return layout(request, "Study", body)


def _trace_link(request: web.Request, trace_id: str | None) -> Markup:
    template = request.app[TRACE_URL_KEY]
    if not template or not trace_id:
        return Markup("")
    return html(' <a class="trace" href="{u}">trace</a>', u=template.replace("{trace_id}", trace_id))


def _event_detail(e: dict[str, Any]) -> Markup:
    kind = e["type"].split(".")[1]
    why = e.get("why") or {}
    if kind == "received":
        return html(
            "from {ae} at {addr}:{port} (called {called})",
            ae=e.get("calling_ae") or "?",
            addr=e.get("peer_address") or "?",
            port=e.get("peer_port"),
            called=e.get("called_ae"),
        )
    if kind == "placed":
        cands = ", ".join(f"{c['node_id']} {c['score']:.3f}" for c in why.get("candidates", []))
        return html(
            "on {n}: {r}{rule}; candidates (score): {c}; attempt {a}",
            n=e["node_id"],
            r=why.get("reason"),
            rule=f", rule {why['rule']}" if why.get("rule") else "",
            c=cands or "–",
            a=why.get("attempt", 0),
        )
    if kind == "forwarded":
        return html(
            "to {n} (status 0x{s}, {d} ms)",
            n=e["node_id"],
            s=f"{e.get('status') or 0:04X}",
            d=round(e.get("duration_ms") or 0, 1),
        )
    if kind in ("retry_requested", "dead_letter_cancelled"):
        target = (
            f" to {e['node_id']}"
            if kind == "retry_requested" and e.get("node_id")
            else (" to the scheduler's choice" if kind == "retry_requested" else "")
        )
        return html("by {a}{t}: “{r}”", a=e.get("actor") or "?", t=target, r=why.get("reason", ""))
    if why:
        return html("on {n}: {r}", n=e["node_id"] or "", r=why.get("reason"))
    return html("on {n}", n=e["node_id"] or "")


async def instance_page(request: web.Request) -> web.Response:
    uid = request.match_info["uid"]
    data = await call_api(request, api.trail, f"/api/instances/{uid}/trail")
    inst = data["instance"] or {}
    items = join(
        html(
            '<li class="ev ev-{k}"><time>{at}</time> <strong>{k}</strong> {d}{tr}</li>',
            k=e["type"].split(".")[1],
            at=e["at"],
            d=_event_detail(e),
            tr=_trace_link(request, e.get("trace_id")),
        )
        for e in data["events"]
    )
    summary = html(
        '<dl class="summary"><div><dt>Instance</dt><dd><code>{u}</code></dd></div>'
        "<div><dt>Study</dt><dd>{s}</dd></div><div><dt>Node</dt><dd>{n}</dd></div>"
        '<div><dt>State</dt><dd id="state">{st}</dd></div></dl>',
        u=uid,
        s=_link(f"/studies/{inst.get('study_instance_uid')}", inst.get("study_instance_uid")),
        n=inst.get("node_id") or "–",
        st=inst.get("state") or "–",
    )
    acts = Markup("")
    if _operator(request) and inst.get("state") == LocationState.DEAD_LETTERED:
        acts = await _dead_letter_forms(request, uid, request.path)
    body = html('{s}{a}<h2>Trail</h2><ol class="timeline" id="trail">{i}</ol>', s=summary, a=acts, i=items)
    return layout(request, "Instance trail", body)


async def _dead_letter_forms(request: web.Request, uid: str, back: str) -> Markup:
    nodes = await api.node_rows(request)
    options = join(html('<option value="{n}">{n}</option>', n=n["node_id"]) for n in nodes if n["state"] == "active")
    key = uid.replace(".", "-")
    return html(
        '<div class="actions"><form method="post" action="/api/dead-letters/{u}/retry" class="retry">{c}'
        '<input type="hidden" name="next" value="{b}">'
        '<label for="node-{k}">Retry to</label><select id="node-{k}" name="node">'
        '<option value="">the scheduler\'s choice</option>{o}</select>{r1}'
        '<button type="submit">Retry</button></form>'
        '<form method="post" action="/api/dead-letters/{u}/cancel" class="cancel">{c}'
        '<input type="hidden" name="next" value="{b}">{r2}'
        '<button type="submit">Cancel dead letter</button></form></div>',
        u=uid,
        k=key,
        c=_csrf(request),
        b=back,
        o=options,
        r1=_reason_input(f"retry-reason-{key}"),
        r2=_reason_input(f"cancel-reason-{key}"),
    )


async def dead_letters_page(request: web.Request) -> web.Response:
    letters = await actions.open_dead_letters(request)
    rows = []
    for d in letters:
        row = [
            _link(f"/instances/{d['sop_instance_uid']}", d["sop_instance_uid"]),
            d["node_id"],
            d["pool"] or "all",
            d["reason"],
            d["at"],
            "final" if d["final"] else "",
        ]
        if _operator(request):
            row.append(await _dead_letter_forms(request, d["sop_instance_uid"], "/dead-letters"))
        rows.append(row)
    headers = ["Instance", "Node", "Pool", "Reason", "When", "Final", *(["Actions"] if _operator(request) else [])]
    return layout(request, "Dead letters", _table(headers, rows, "dead-letters", f"{len(rows)} open"))


async def nodes_page(request: web.Request) -> web.Response:
    nodes = await api.node_rows(request)
    op = _operator(request)
    rows = []
    for n in nodes:
        row = [
            n["node_id"],
            n["state"] or "unknown",
            n["state_reason"] or "",
            ", ".join(f"{k} {v}" for k, v in sorted(n["instances"].items())),
        ]
        if op and n["state"] not in (None, "removed"):
            forms = []
            for action, label in (
                ("undrain", "Undrain") if n["state"] == "drained" else ("drain", "Drain"),
                ("remove", "Remove"),
            ):
                forms.append(
                    html(
                        '<form method="post" action="/api/nodes/{n}/{a}" class="node-action">{c}'
                        '<input type="hidden" name="next" value="/nodes">{r}'
                        '<button type="submit" data-action="{a}">{l} {n}</button></form>',
                        n=n["node_id"],
                        a=action,
                        l=label,
                        c=_csrf(request),
                        r=_reason_input(f"{action}-{n['node_id']}"),
                    )
                )
            row.append(join(forms))
        elif op:
            row.append("")
        rows.append(row)
    body = _table(["Node", "State", "Why", "Instances", *(["Actions"] if op else [])], rows, "nodes", "Nodes")
    if op:
        fields = join(
            html(
                '<div><label for="add-{n}">{l}</label><input id="add-{n}" name="{n}"{req}></div>',
                n=n,
                l=label,
                req=Markup(" required") if req else Markup(""),
            )
            for n, label, req in (
                ("node_id", "Node id", True),
                ("host", "Host", True),
                ("dicom_port", "DICOM port", True),
                ("ae_title", "AE title", True),
                ("rest_url", "REST URL", True),
                ("username", "REST user (password from config)", False),
            )
        )
        body = html(
            '{t}<h2>Add a node</h2><form method="post" action="/api/nodes" class="add-node">{c}'
            '<input type="hidden" name="next" value="/nodes">{f}{r}<button type="submit">Add node</button></form>',
            t=body,
            c=_csrf(request),
            f=fields,
            r=_reason_input("add-reason"),
        )
    return layout(request, "Nodes", body)


async def rules_page(request: web.Request) -> web.Response:
    rules = await actions.current_rules(request)
    src = (
        html(
            "from the log (seq {s}, {at}, by {a}: “{r}”)",
            s=rules["seq"],
            at=rules["at"],
            a=rules["actor"],
            r=rules["reason"],
        )
        if rules["source"] == "log"
        else Markup("from the config file")
    )
    if _operator(request):
        body = html(
            "<p>Rules in force: {src}. A change is recorded on the log; every scheduler applies the latest.</p>"
            '<form method="post" action="/api/routing/rules" class="rules">{c}'
            '<input type="hidden" name="next" value="/rules">'
            '<label for="document">Rules (TOML: [[rules]] name, pools, match; [pools])</label>'
            '<textarea id="document" name="document" rows="16" cols="80" spellcheck="false">{d}</textarea>{r}'
            '<button type="submit">Apply rules</button></form>',
            src=src,
            c=_csrf(request),
            d=rules["document"],
            r=_reason_input("rules-reason"),
        )
    else:
        body = html("<p>Rules in force: {src}.</p><pre>{d}</pre>", src=src, d=rules["document"])
    return layout(request, "Routing rules", body)


async def docs_page(request: web.Request) -> web.Response:
    doc = openapi.document()
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            rows.append(
                [
                    method.upper(),
                    html("<code>{p}</code>", p=path),
                    op.get("summary", ""),
                    ", ".join(sorted(op.get("x-roles", ["viewer", "operator"]))),
                ]
            )
    body = html(
        "<p>The machine-readable document: {l}. Bearer tokens:"
        " <code>Authorization: Bearer &lt;token&gt;</code>.</p>{t}",
        l=_link("/api/openapi.json", "/api/openapi.json"),
        t=_table(["Method", "Path", "What", "Roles"], rows, "endpoints", "Endpoints"),
    )
    return layout(request, "HTTP API", body)


def routes(app: web.Application) -> None:
    app.router.add_get("/login", login_get)
    app.router.add_post("/login", login_post)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", overview_page)
    app.router.add_get("/search", search_page)
    app.router.add_get("/studies/{uid}", study_page)
    app.router.add_get("/instances/{uid}", instance_page)
    app.router.add_get("/dead-letters", dead_letters_page)
    app.router.add_get("/nodes", nodes_page)
    app.router.add_get("/rules", rules_page)
    app.router.add_get("/api/docs", docs_page)


__all__ = ["error_page", "quote", "routes", "urlencode"]
