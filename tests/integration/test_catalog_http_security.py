"""The catalog API's door, attacked over real sockets: the catalog service runs against a real
nats-server, with instances stored for real through ingest (DCMTK storescu).

Roles (viewer / operator / the deprecated single token), malformed Authorization
headers, a client that never finishes its headers or its body, TLS, and what
the access and error logs carry (never a query string).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

import msgspec
import pytest
from aiohttp import web

from services.catalog.api import build_app, runner_options
from services.catalog.auth import require_role
from shared.config import CatalogConfig, CatalogToken
from shared.readmodel.catalog import CatalogStore
from switchyard.corpus import generate_studies
from tests.fixtures.servers import OPERATOR_TOKEN, VIEWER_TOKEN, make_stack
from tests.fixtures.util import free_port, wait_for

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
LEGACY_TOKEN = "legacy-single-token"
PATIENT_FIELDS = {"patient_id", "patient_name", "patient_birth_date", "accession_number"}


def door_config(cfg):
    catalog = msgspec.structs.replace(
        cfg.catalog, header_timeout_s=HEADER_TIMEOUT, body_timeout_s=BODY_TIMEOUT, token=LEGACY_TOKEN
    )
    ingest = msgspec.structs.replace(cfg.ingest, extra_tags=["PatientSex", "Manufacturer"])
    return msgspec.structs.replace(cfg, catalog=catalog, ingest=ingest)


@pytest.fixture(scope="module")
def door(orthanc_nodes, tmp_path_factory):
    """NATS, ingest and the catalog; one study stored (patient DEMO01)."""
    stack = make_stack(
        tmp_path_factory.mktemp("door"), orthanc_nodes, services=("ingest", "catalog"), configure=door_config
    )
    try:
        files = generate_studies(
            tmp_path_factory.mktemp("door-corpus"), studies=1, series_per_study=1, instances_per_series=2, seed=4242
        )
        result = stack.send(files, calling_ae="DOORSCU")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: len(stack.catalog("/api/instances")) == len(files), timeout=30, what="instances in catalog")
        yield stack
    finally:
        stack.close()


def call(stack, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.cfg.catalog.http_port}{path}", headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- roles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/studies", "/api/series", "/api/instances"])
def test_viewer_gets_no_patient_fields_operator_does(door, path):
    status, viewer_rows = call(door, path, bearer(VIEWER_TOKEN))
    assert status == 200 and viewer_rows
    assert all(not PATIENT_FIELDS & set(row) for row in viewer_rows)
    status, operator_rows = call(door, path, bearer(OPERATOR_TOKEN))
    assert status == 200
    assert {row["patient_id"] for row in operator_rows} == {"DEMO01"}
    if path == "/api/instances":  # extra tags named like patient data are masked too
        assert all("PatientSex" not in r["extra_tags"] and "Manufacturer" in r["extra_tags"] for r in viewer_rows)
        assert all("PatientSex" in r["extra_tags"] for r in operator_rows)


@pytest.mark.parametrize("query", ["patient_id=DEMO01", "accession=ACC1", "tag.PatientSex=O"])
def test_viewer_cannot_search_by_patient_values(door, query):
    status, body = call(door, f"/api/studies?{query}", bearer(VIEWER_TOKEN))
    assert status == 403 and "operator" in body["error"]
    assert call(door, f"/api/studies?{query}", bearer(OPERATOR_TOKEN))[0] == 200


def test_deprecated_single_token_is_an_operator_with_a_warning(door):
    status, rows = call(door, "/api/studies", bearer(LEGACY_TOKEN))
    assert status == 200 and rows[0]["patient_id"] == "DEMO01"
    assert "catalog.token is deprecated" in door.log("catalog")
    assert LEGACY_TOKEN not in door.log("catalog")


def test_wrong_and_missing_tokens_are_401(door):
    for headers in ({}, bearer("wrong"), bearer(hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest())):
        status, body = call(door, "/api/totals", headers)
        assert (status, body) == (401, {"error": "missing or wrong bearer token"})
    assert call(door, "/healthz")[0] == 200


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are, read the answer until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return out
            if not chunk:
                return out
            out += chunk


@pytest.mark.parametrize(
    "value",
    [
        "Bearer tökén".encode(),
        "Bearer \xff\xfe".encode("latin-1"),
        b"Bearer",
        b"Bearer ",
        b"",
        b"Basic dXNlcjpwYXNz",
        b"Bearer a b",
        b"bearer\ttoken",
        b"Bearer " + b"x" * 4000,
        f"Bearer {OPERATOR_TOKEN}\x7f".encode(),
    ],
)
def test_malformed_authorization_header_is_401_never_500(door, value):
    answer = raw_request(
        door.cfg.catalog.http_port,
        b"GET /api/totals HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + value + b"\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    if value.endswith(b"\x7f"):  # a control character: aiohttp's parser refuses the request itself
        assert head.startswith(b"HTTP/1.0 400"), answer[:200]
    else:
        assert head.startswith(b"HTTP/1.1 401"), answer[:200]
        assert "error" in json.loads(body)
    log = door.log("catalog")
    assert "Traceback" not in log and " 500 " not in log and OPERATOR_TOKEN not in log


def test_a_route_needing_operator_refuses_a_viewer(tmp_path):
    """require_role on a route of the real app (the console's actions use it), served on a real socket."""
    import asyncio

    tokens = [
        CatalogToken(name=f"t-{role}", role=role, sha256=hashlib.sha256(role.encode()).hexdigest())
        for role in ("viewer", "operator")
    ]
    catalog = CatalogConfig(tokens=tokens)
    port = free_port()

    async def act(request: web.Request) -> web.Response:
        who = require_role(request, "operator")
        return web.json_response({"by": who, "role": request["role"]})

    async def scenario() -> list[tuple[int, object]]:
        store = CatalogStore(tmp_path / "c.duckdb")
        app = build_app(store, catalog)
        app.router.add_post("/api/test/act", act)
        runner = web.AppRunner(app, **runner_options(catalog))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:

            def post(token: str | None) -> tuple[int, object]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/api/test/act", body=b"{}", headers=bearer(token) if token else {})
                rsp = conn.getresponse()
                return rsp.status, json.loads(rsp.read())

            return [await asyncio.to_thread(post, t) for t in ("viewer", "operator", None)]
        finally:
            await runner.cleanup()
            store.close()

    viewer, operator, anonymous = asyncio.run(scenario())
    assert viewer == (403, {"error": "this needs the operator role"})
    assert operator == (200, {"by": "t-operator", "role": "operator"})
    assert anonymous[0] == 401


# --- timeouts -------------------------------------------------------------------------------


def seconds_until_closed(
    port: int, first: bytes, trickle: bytes = b"", every: float = 0.25, limit: float = 30.0
) -> tuple[float, bytes]:
    """Connect, send ``first``, then one byte of ``trickle`` every ``every`` s; time until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        start = time.monotonic()
        s.sendall(first)
        s.settimeout(every)
        got, i = b"", 0
        while time.monotonic() - start < limit:
            try:
                chunk = s.recv(65536)
                if not chunk:
                    return time.monotonic() - start, got
                got += chunk
            except TimeoutError:
                if i < len(trickle):
                    try:
                        s.sendall(trickle[i : i + 1])
                    except OSError:
                        return time.monotonic() - start, got
                    i += 1
            except ConnectionResetError:
                return time.monotonic() - start, got
        return limit, got


@pytest.mark.parametrize(
    "first,trickle",
    [
        (b"", b""),  # connects and says nothing
        (b"GET /api/totals HTTP/1.1\r\nHost: x\r\n", b""),  # headers never finish
        (b"GET /api/totals HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200),  # a byte at a time (each resets nothing)
    ],
)
def test_a_client_that_never_finishes_its_headers_is_cut_off(door, first, trickle):
    elapsed, got = seconds_until_closed(door.cfg.catalog.http_port, first, trickle)
    assert got == b""
    assert HEADER_TIMEOUT - 0.3 <= elapsed <= HEADER_TIMEOUT + 3.0, elapsed


def test_a_body_that_never_finishes_gets_408(door):
    head = (
        f"POST /api/totals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPERATOR_TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    elapsed, got = seconds_until_closed(door.cfg.catalog.http_port, head + b'{"a": ', trickle=b" " * 100)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert BODY_TIMEOUT - 0.3 <= elapsed <= BODY_TIMEOUT + 3.0, elapsed


def test_a_keep_alive_client_may_send_several_requests_in_time(door):
    conn = http.client.HTTPConnection("127.0.0.1", door.cfg.catalog.http_port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/api/totals", headers=bearer(VIEWER_TOKEN))
        rsp = conn.getresponse()
        assert rsp.status == 200 and json.loads(rsp.read())["instances"] == 2
    conn.close()


# --- logs -----------------------------------------------------------------------------------


def test_access_log_carries_path_status_and_principal_never_the_query(door):
    assert call(door, "/api/studies?patient_id=SENTINELQUERY&limit=5", bearer(OPERATOR_TOKEN))[0] == 200
    assert call(door, "/api/instances?accession=SENTINELQUERY", bearer(VIEWER_TOKEN))[0] == 403
    # A path with a control character cannot forge a log line.
    assert raw_request(
        door.cfg.catalog.http_port,
        b"GET /api/x%0AFORGED HTTP/1.1\r\nHost: x\r\nConnection: close"
        b"\r\nAuthorization: Bearer " + VIEWER_TOKEN.encode() + b"\r\n\r\n",
    ).startswith(b"HTTP/1.1 404")

    def logged() -> str:
        text = door.log("catalog")
        return text if "GET /api/instances 403" in text and "%0AFORGED" in text else ""

    log = wait_for(logged, timeout=10, what="access log lines")
    assert "GET /api/studies 200" in log and "test-operator" in log and "test-viewer" in log
    assert "SENTINELQUERY" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert VIEWER_TOKEN not in log and OPERATOR_TOKEN not in log


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/studies?patient_id=SENTINELBAD1&accession=SENTINELBAD1 HTTP/1.1 x\r\nHost: x\r\n\r\n",
        b"GET /api/studies?patient_id=SENTINELBAD2 HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /api/studies?patient_id=SENTINELBAD3 HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    ],
)
def test_a_malformed_request_is_logged_without_its_query_string(door, request_bytes):
    sentinel = request_bytes.split(b"=")[1].split(b" ")[0].split(b"&")[0].decode()
    before = door.log("catalog").count("Error handling request")
    answer = raw_request(door.cfg.catalog.http_port, request_bytes)
    assert answer.startswith(b"HTTP/1.0 400"), answer[:200]

    def logged() -> str:  # aiohttp logs the bad request (as ERROR): wait for it, then look for the query string
        text = door.log("catalog")
        return text if text.count("Error handling request") > before else ""

    log = wait_for(logged, timeout=10, what="the bad request logged")
    assert "BadHttpMessage" in log or "BadStatusLine" in log or "InvalidHeader" in log
    assert sentinel not in log


# --- TLS ------------------------------------------------------------------------------------


def test_tls_only_when_configured(orthanc_nodes, tmp_path, pki):
    def with_tls(cfg):
        return msgspec.structs.replace(
            cfg,
            catalog=msgspec.structs.replace(
                cfg.catalog, tls_cert_file=str(pki["server_crt"]), tls_key_file=str(pki["server_key"])
            ),
        )

    stack = make_stack(tmp_path / "tls", orthanc_nodes, services=("catalog",), configure=with_tls)
    try:
        port = stack.cfg.catalog.http_port
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        req = urllib.request.Request(f"https://127.0.0.1:{port}/api/totals", headers=bearer(VIEWER_TOKEN))
        with urllib.request.urlopen(req, timeout=5, context=ctx) as rsp:
            assert rsp.status == 200 and "instances" in json.loads(rsp.read())
        # Plain HTTP on the TLS port gets no answer (the handshake fails).
        with pytest.raises((http.client.HTTPException, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/api/totals", headers=bearer(VIEWER_TOKEN)), timeout=5
            ).read()
        assert "catalog API on https://" in stack.log("catalog")
    finally:
        stack.close()


# --- the local stack's credentials ----------------------------------------------------------


def test_local_stack_tokens_are_0600_and_the_config_holds_only_hashes(tmp_path, capsys):
    from shared.config import Config, load_config
    from switchyard import stack as ls

    cfg, path = ls.catalog_credentials(Config(), tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    tokens = ls.read_catalog_tokens(tmp_path)
    assert set(tokens) == {"viewer", "operator"} and tokens["viewer"] != tokens["operator"]
    written = ls.write_config(cfg, tmp_path / "switchyard.toml").read_text()
    assert tokens["viewer"] not in written and tokens["operator"] not in written
    by_role = {t.role: t for t in load_config(tmp_path / "switchyard.toml", env={}).catalog.tokens}
    assert by_role["operator"].sha256 == hashlib.sha256(tokens["operator"].encode()).hexdigest()
    assert by_role["viewer"].name == "local-viewer"
    again, _ = ls.catalog_credentials(cfg, tmp_path)  # the same tokens next time, not duplicated
    assert ls.read_catalog_tokens(tmp_path) == tokens and len(again.catalog.tokens) == 2
    assert tokens["operator"] not in capsys.readouterr().out
