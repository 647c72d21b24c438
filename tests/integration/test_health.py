"""Readiness follows the real dependencies: /readyz turns 503 (naming NATS) while nats-server
is down and 200 again once the service has reconnected and its consumers are bound;
/healthz (liveness) stays 200 throughout, so a supervisor never kills a process that waits."""

from __future__ import annotations

import urllib.error
import urllib.request
from functools import partial

import pytest

from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration


def status(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def answers(port: int, path: str, want) -> bool:
    got = status(port, path)
    return got[0] == want if isinstance(want, int) else got == want


def test_readiness_follows_nats_and_liveness_does_not(orthanc_nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", orthanc_nodes, services=("scheduler", "ingest"))
    try:
        ports = {s: getattr(stack.cfg, s).metrics_port for s in ("scheduler", "ingest")}
        for service, port in ports.items():
            wait_for(partial(answers, port, "/readyz", 200), timeout=30, what=f"{service} ready")
        stack.stop_nats()
        for service, port in ports.items():
            wait_for(partial(answers, port, "/readyz", 503), timeout=30, what=f"{service} not ready")
            code, body = status(port, "/readyz")
            assert code == 503 and "nats" in body, (service, body)
            assert status(port, "/healthz") == (200, "ok\n"), service
        stack.start_nats()
        for service, port in ports.items():
            wait_for(partial(answers, port, "/readyz", (200, "ready\n")), timeout=60, what=f"{service} ready again")
    finally:
        stack.close()
