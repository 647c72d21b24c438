"""The catalog API's door: bearer tokens with roles, one middleware, and the helpers handlers use.

Tokens are kept in the config as sha256 digests (the file grants nothing) and
compared as digests with ``hmac.compare_digest`` over bytes, every entry each
time, so neither a non-ASCII header nor timing tells anything. Any malformed
``Authorization`` header is a 401 with a JSON body, never a 500.

The middleware puts ``request["role"]`` ("viewer" | "operator") and
``request["principal"]`` (the token's name) on every authenticated request;
routes call ``require_role(request, "operator")`` for actions.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from shared.config import CatalogConfig

log = logging.getLogger("switchyard.catalog.auth")

ROLES = ("viewer", "operator")
_RANK = {role: i for i, role in enumerate(ROLES)}
# Paths served without a token (liveness only: no data).
PUBLIC_PATHS = frozenset({"/healthz"})
# RFC 6750 b64token.
_BEARER = re.compile(rb"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


class TokenTable:
    """Token digests -> who holds them."""

    def __init__(self, entries: list[tuple[bytes, Principal]]) -> None:
        self.entries = entries

    @classmethod
    def from_config(cls, catalog: CatalogConfig) -> TokenTable:
        entries = [(bytes.fromhex(t.sha256), Principal(t.name, t.role)) for t in catalog.tokens]
        if catalog.token:
            entries.append((hashlib.sha256(catalog.token.encode()).digest(), Principal("legacy-token", "operator")))
        return cls(entries)

    def lookup(self, token: bytes) -> Principal | None:
        digest = hashlib.sha256(token).digest()
        found = None
        for expected, principal in self.entries:  # no early exit: every entry is compared
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


def bearer_token(header: str) -> bytes | None:
    """The token of ``Bearer <token>``, or None for anything else (non-ASCII, other scheme, empty)."""
    try:
        raw = header.encode("ascii")
    except UnicodeEncodeError:
        return None
    m = _BEARER.match(raw)
    return m.group(1) if m else None


def _json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


TOKENS_KEY = web.AppKey("tokens", TokenTable)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
VIEWER_SEES_PATIENT_KEY = web.AppKey("viewer_sees_patient_data", bool)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who is calling (401 if nobody we know), then the body within its timeout (408)."""
    if request.path in PUBLIC_PATHS and request.method in ("GET", "HEAD"):
        return await handler(request)
    header = request.headers.get("Authorization")
    if header is None:
        return _json_error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
    token = bearer_token(header)
    if token is None:
        return _json_error(
            401,
            "malformed Authorization header; expected 'Bearer <token>'",
            **{"WWW-Authenticate": 'Bearer error="invalid_request"'},
        )
    principal = request.app[TOKENS_KEY].lookup(token)
    if principal is None:
        return _json_error(401, "missing or wrong bearer token", **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
    request["role"] = principal.role
    request["principal"] = principal.name
    if request.body_exists:
        # Read (and cache) the whole body now, so a client that stops sending holds nothing for long.
        try:
            await asyncio.wait_for(request.read(), request.app[BODY_TIMEOUT_KEY])
        except TimeoutError:
            return _json_error(408, "request body not received in time", Connection="close")
    return await handler(request)


def require_role(request: web.Request, role: str) -> str:
    """The caller's name if its role is ``role`` or above; 403 otherwise. For handlers of actions."""
    have = request.get("role")
    if have is None or _RANK[have] < _RANK[role]:
        raise web.HTTPForbidden(
            text=json.dumps({"error": f"this needs the {role} role"}), content_type="application/json"
        )
    return str(request["principal"])


def sees_patient_data(request: web.Request) -> bool:
    """Operators always; viewers only with catalog.viewer_sees_patient_data."""
    role = request.get("role")
    return role == "operator" or (role == "viewer" and request.app[VIEWER_SEES_PATIENT_KEY])


def _printable(text: str) -> str:
    """Control and non-ASCII characters escaped: a request cannot forge or break a log line."""
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


class AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string: search values are patient data), status, time, who."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d %.3fs %s",
            _printable(request.method),
            _printable(request.rel_url.raw_path),
            response.status,
            time,
            _printable(str(request.get("principal", "-"))),
        )


class NoRequestText(logging.Filter):
    """For aiohttp's server logger: an exception is logged by type and frames, never its text.

    aiohttp logs a malformed request with the parser's message, which quotes the
    request line (query string included); handler exceptions may quote values.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc.__traceback__ else ""
            message = record.getMessage()
            record.msg = "%s: %s" + ("\n%s" if frames else "")
            record.args = (message, type(exc).__name__, *((frames,) if frames else ()))
            record.exc_info = None
            record.exc_text = None
        return True


def http_logger() -> logging.Logger:
    """The logger the catalog's HTTP server reports errors on (filtered as above)."""
    logger = logging.getLogger("switchyard.catalog.http")
    if not any(isinstance(f, NoRequestText) for f in logger.filters):
        logger.addFilter(NoRequestText())
    return logger
