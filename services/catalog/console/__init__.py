"""The web console: server-rendered pages on the catalog's HTTP server, a session per login, CSRF on every POST.

A person signs in once with a catalog token (the form posts it; it is checked
against the same hashed token table as the API) and gets a server-side session:
a random id in a cookie (HttpOnly, SameSite=Strict, Secure under TLS, Path=/),
idle expiry ``SESSION_IDLE_S``, absolute ``SESSION_MAX_S``. Every POST made
with the cookie must carry the session's CSRF token (hidden form field
``csrf`` or header ``X-CSRF-Token``) and no cross-site ``Origin`` /
``Sec-Fetch-Site``; otherwise 403. Requests with an ``Authorization`` header
go to the bearer-token check unchanged (curl, the CLI).
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from aiohttp import web

from services.catalog.auth import BODY_TIMEOUT_KEY, TOKENS_KEY, Handler
from shared.config import CatalogConfig

COOKIE = "switchyard_session"
SESSION_IDLE_S = 30 * 60.0
SESSION_MAX_S = 8 * 3600.0
MAX_SESSIONS = 10_000
STATIC = Path(__file__).parent / "static"
_SAFE = ("GET", "HEAD", "OPTIONS")


@dataclass
class Session:
    id: str
    principal: str
    role: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    """In memory (a restart signs everyone out): id -> session, expired lazily."""

    def __init__(self) -> None:
        self.by_id: dict[str, Session] = {}

    def create(self, principal: str, role: str) -> Session:
        if len(self.by_id) >= MAX_SESSIONS:
            self.prune()
            if len(self.by_id) >= MAX_SESSIONS:  # still full: the oldest goes
                del self.by_id[min(self.by_id.values(), key=lambda s: s.seen).id]
        s = Session(secrets.token_urlsafe(32), principal, role)
        self.by_id[s.id] = s
        return s

    def get(self, sid: str) -> Session | None:
        s = self.by_id.get(sid) if sid else None
        if s is None:
            return None
        now = time.monotonic()
        if now - s.seen > SESSION_IDLE_S or now - s.created > SESSION_MAX_S:
            del self.by_id[sid]
            return None
        s.seen = now
        return s

    def drop(self, sid: str) -> None:
        self.by_id.pop(sid, None)

    def prune(self) -> None:
        for sid in list(self.by_id):
            self.get(sid)


SESSIONS_KEY = web.AppKey("sessions", Sessions)
SECURE_KEY = web.AppKey("cookie_secure", bool)
TRACE_URL_KEY = web.AppKey("trace_url_template", str)


def forbidden(message: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=f'{{"error": "{message}"}}', content_type="application/json")


def cross_site(request: web.Request) -> bool:
    """A request a page of another origin made: Origin not ours, or the browser says cross-site."""
    origin = request.headers.get("Origin")
    # Host and port only: behind a TLS-terminating proxy the server sees http while the page is https.
    if origin is not None and urlsplit(origin).netloc != request.host:
        return True
    return request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")


async def _read_body(request: web.Request) -> None:
    try:
        await asyncio.wait_for(request.read(), request.app[BODY_TIMEOUT_KEY])
    except TimeoutError:
        raise web.HTTPRequestTimeout(text='{"error": "request body not received in time"}') from None


async def _direct(request: web.Request) -> web.StreamResponse:
    """The route's own handler: a session (or a public console path) stands in for the bearer check."""
    return await request.match_info.handler(request)


def _public(path: str) -> bool:
    return path == "/login" or path.startswith("/static/")


def _page(path: str) -> bool:
    """A console page (HTML), not the JSON API."""
    return not path.startswith("/api/") or path == "/api/docs"


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if "Authorization" in request.headers or request.path == "/healthz":
        return await handler(request)  # bearer tokens: services/catalog/auth.py, unchanged
    if _public(request.path):
        if request.method not in _SAFE and request.body_exists:
            await _read_body(request)  # the sign-in form: within the body timeout, as every API body
        return await _direct(request)
    session = request.app[SESSIONS_KEY].get(request.cookies.get(COOKIE, ""))
    if session is None:
        if request.method == "GET" and _page(request.path):
            raise web.HTTPSeeOther("/login?next=" + quote(request.path_qs, safe=""))
        if COOKIE in request.cookies and request.content_type == "application/x-www-form-urlencoded":
            raise web.HTTPSeeOther("/login")  # a console form after the session expired: sign in again
        return await handler(request)  # no credentials: the API's 401, as before
    if request.method not in _SAFE:
        if cross_site(request):
            raise forbidden("cross-site request refused")
        if request.body_exists:
            await _read_body(request)
        sent = request.headers.get("X-CSRF-Token")
        if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            value = (await request.post()).get("csrf")
            sent = value if isinstance(value, str) else None
        if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise forbidden("missing or wrong CSRF token")
    request["role"] = session.role
    request["principal"] = session.principal
    request["session"] = session
    form = request.method not in _SAFE and request.content_type != "application/json"
    try:
        return await _direct(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not (form or _page(request.path)):
            raise
        from services.catalog.console.pages import error_page

        return error_page(request, exc)


def cookie_for(request: web.Request, response: web.StreamResponse, session: Session | None) -> None:
    secure = request.app[SECURE_KEY]
    if session is None:
        response.del_cookie(COOKIE, path="/", secure=secure, httponly=True, samesite="Strict")
        return
    response.set_cookie(
        COOKIE, session.id, max_age=int(SESSION_IDLE_S), path="/", secure=secure, httponly=True, samesite="Strict"
    )


def setup(app: web.Application, catalog: CatalogConfig, trace_url_template: str = "") -> None:
    from services.catalog.console import pages

    app[SESSIONS_KEY] = Sessions()
    app[SECURE_KEY] = bool(catalog.tls_cert_file)
    app[TRACE_URL_KEY] = trace_url_template
    app.router.add_static("/static/", STATIC, name="static", append_version=True)
    pages.routes(app)


__all__ = ["TOKENS_KEY", "session_middleware", "setup"]
