"""The OpenAPI document at /api/openapi.json validates, and every route it lists answers as it says
(status among the documented ones, JSON bodies matching the documented schemas), on the real catalog
service in front of a real nats-server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.fixtures.servers import OPERATOR_TOKEN, VIEWER_TOKEN, catalog_ready, make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

RULES = (
    '[pools]\nall_but_3 = ["node1", "node2"]\n[[rules]]\nname = "mr"\npools = ["all_but_3"]\n'
    + 'match = { modality = "MR" }\n'
)
# Path parameters and bodies for each documented operation, and the status expected from each.
SAMPLES: dict[tuple[str, str], tuple[dict[str, str], dict[str, Any] | None, int]] = {
    ("get", "/healthz"): ({}, None, 200),
    ("get", "/api/overview"): ({}, None, 200),
    ("get", "/api/studies"): ({}, None, 200),
    ("get", "/api/series"): ({}, None, 200),
    ("get", "/api/instances"): ({}, None, 200),
    ("get", "/api/instances/{uid}/trail"): ({"uid": "1.2.3.4"}, None, 404),
    ("get", "/api/studies/{uid}/trail"): ({"uid": "1.2.3.4"}, None, 404),
    ("get", "/api/nodes"): ({}, None, 200),
    ("post", "/api/nodes"): ({}, {"reason": "openapi test", "node_id": "node9"}, 400),
    ("post", "/api/nodes/{node_id}/{action}"): ({"node_id": "node1", "action": "drain"}, {"reason": "openapi"}, 202),
    ("get", "/api/totals"): ({}, None, 200),
    ("get", "/api/dead-letters"): ({}, None, 200),
    ("post", "/api/dead-letters/{uid}/retry"): ({"uid": "1.2.3.4"}, {"reason": "openapi test"}, 409),
    ("post", "/api/dead-letters/{uid}/cancel"): ({"uid": "1.2.3.4"}, {"reason": "openapi test"}, 409),
    ("get", "/api/routing/rules"): ({}, None, 200),
    ("post", "/api/routing/rules"): ({}, {"reason": "openapi test", "document": RULES}, 202),
    ("get", "/api/openapi.json"): ({}, None, 200),
}


@pytest.fixture(scope="module")
def catalog(orthanc_nodes, tmp_path_factory):
    stack = make_stack(tmp_path_factory.mktemp("openapi"), orthanc_nodes, services=("catalog",))
    try:
        wait_for(lambda: catalog_ready(stack), timeout=30, what="catalog up")
        yield stack
    finally:
        stack.close()


def request(stack, method: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.cfg.catalog.http_port}{path}", data=data, headers=headers, method=method.upper()
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, rsp.headers.get_content_type(), json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), json.loads(exc.read())


def resolved(node: Any, doc: dict) -> Any:
    """The schema with its local $refs replaced (the document is small and has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolved(target, doc)
        return {k: resolved(v, doc) for k, v in node.items()}
    if isinstance(node, list):
        return [resolved(v, doc) for v in node]
    return node


def fetch_document(stack) -> dict:
    status, ctype, doc = request(stack, "get", "/api/openapi.json", VIEWER_TOKEN)
    assert status == 200 and ctype == "application/json"
    return doc


def test_the_document_validates(catalog):
    doc = fetch_document(catalog)
    validate(doc)  # OpenAPI 3.1 (openapi-spec-validator): raises on an invalid document
    assert doc["openapi"].startswith("3.1")


def test_every_documented_route_answers_as_documented(catalog):
    doc = fetch_document(catalog)
    operations = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert operations == set(SAMPLES), "a route without a sample here, or a sample for an undocumented route"
    for (method, template), (params, body, expected) in SAMPLES.items():
        op = doc["paths"][template][method]
        path = template.format(**params)
        status, ctype, payload = request(catalog, method, path, OPERATOR_TOKEN, body)
        assert status == expected, (method, path, status, payload)
        documented = op["responses"][str(status)]
        documented = resolved(documented, doc)
        assert ctype == "application/json"
        jsonschema.validate(payload, documented["content"]["application/json"]["schema"])
        if op.get("security") == []:
            continue
        # Without a token: 401, as documented; a viewer may not act: 403, as documented.
        status, _, payload = request(catalog, method, path, None, body)
        assert status == 401 and "401" in op["responses"], (method, path)
        if method == "post":
            status, _, payload = request(catalog, method, path, VIEWER_TOKEN, body)
            assert status == 403 and "403" in op["responses"] and op["x-roles"] == ["operator"], (method, path)


def test_what_the_documented_actions_recorded(catalog):
    """The 202s above are facts on the log: the drain shows in /api/nodes, the rules in /api/routing/rules."""
    wait_for(
        lambda: next(n for n in catalog.catalog("/api/nodes") if n["node_id"] == "node1")["state"] == "drained",
        timeout=10,
        what="node1 drained",
    )
    rules = wait_for(
        lambda: (r := catalog.catalog("/api/routing/rules"))["source"] == "log" and r,
        timeout=10,
        what="rules on the log",
    )
    assert rules["actor"] == "test-operator" and 'name = "mr"' in rules["document"]
