"""deploy/compose.yaml in real containers: routes, survives kills and down/up.

deploy/offline/harness.py finds a Docker engine or starts dockerd in its own
network namespace, and builds the images (local stand-ins where no registry is
reachable, see deploy/compose.offline.yaml). Clients (compose, storescu,
findscu, HTTP checks) run inside that namespace through the harness's `run`, so
the published ports are the namespace's 127.0.0.1 and nothing touches the host's.

One module-scoped stack; the tests run in file order and build on each other
(the instances of every step must still be there at the end).
SWITCHYARD_COMPOSE_OFFLINE=0 uses the shipped compose file alone (official
images, `--build`) on an existing engine; the default is the offline override.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from switchyard.corpus import generate_studies
from tests.fixtures.compose import (
    SERVICES,
    UP_TIMEOUT_S,
    catalog_verified,
    compose,
    compose_stack,
    docker,
    http_json,
    offline,
    orthanc_sops,
    run_in,
)

pytestmark = [pytest.mark.integration, pytest.mark.compose]

ROUTE_TIMEOUT_S = 180


def wait_for(cond, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (AssertionError, ValueError, subprocess.TimeoutExpired) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last error: {last})")


class Corpus:
    """What was sent so far: the files and their SOP/Study UIDs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sops: dict[str, str] = {}  # SOP Instance UID -> Study Instance UID
        self.batches = 0

    def make(self, studies: int, series: int = 2, per_series: int = 5) -> list[Path]:
        self.batches += 1
        dest = self.root / f"batch{self.batches}"
        paths = generate_studies(
            dest,
            studies=studies,
            series_per_study=series,
            instances_per_series=per_series,
            seed=1000 + self.batches,
            rows=32,
            cols=32,
        )
        return paths

    def send(self, paths: list[Path]) -> float:
        """storescu from inside the namespace to the published ingest port; seconds taken."""
        t0 = time.monotonic()
        run_in(
            [
                "/usr/bin/storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "SWITCHYARD",
                "-R",
                "127.0.0.1",
                "11112",
                *map(str, paths),
            ],
            timeout=300,
        )
        elapsed = time.monotonic() - t0
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.sops[ds.SOPInstanceUID] = ds.StudyInstanceUID
        return elapsed

    def all_routed(self) -> dict[str, str]:
        """Every sent instance on exactly one Orthanc and verified in the catalog on that node; SOP -> node."""
        held = orthanc_sops()
        verified = catalog_verified()
        where = {}
        for sop in self.sops:
            nodes = [n for n, sops in held.items() if sop in sops]
            if len(nodes) != 1 or verified.get(sop) != nodes[0]:
                return {}
            where[sop] = nodes[0]
        return where

    def assert_routed(self, timeout: float = ROUTE_TIMEOUT_S) -> dict[str, str]:
        where = wait_for(self.all_routed, timeout, f"{len(self.sops)} instances on one Orthanc each and verified")
        # Never on two nodes, and one node per study (affinity).
        held = orthanc_sops()
        for sop in self.sops:
            assert sum(sop in s for s in held.values()) == 1, sop
        by_study: dict[str, set[str]] = {}
        for sop, study in self.sops.items():
            by_study.setdefault(study, set()).add(where[sop])
        assert all(len(nodes) == 1 for nodes in by_study.values()), by_study
        return where


def container_state(service: str) -> dict:
    cid = compose("ps", "-a", "-q", service).stdout.strip()
    assert cid, f"no container for {service}"
    return json.loads(docker("inspect", "--format", "{{json .State}}", cid).stdout) | {"id": cid}


def healthy(service: str) -> bool:
    state = container_state(service)
    health = (state.get("Health") or {}).get("Status")
    return state["Running"] and health in (None, "healthy")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with compose_stack(tmp_path_factory.getbasetemp()):
        yield Corpus(tmp_path_factory.mktemp("compose-corpus"))


def test_every_container_is_healthy(stack):
    for service in (*SERVICES, "nats", "minio", "orthanc1", "orthanc2", "orthanc3"):
        assert healthy(service), service


def test_corpus_routed_once_and_verified(stack):
    paths = stack.make(studies=10, series=2, per_series=10)
    t0 = time.monotonic()
    sent_s = stack.send(paths)
    stack.assert_routed()
    total = time.monotonic() - t0
    print(
        f"\ncompose test: {len(paths)} instances sent in {sent_s:.1f} s, all verified after {total:.1f} s "
        f"({len(paths) / total:.1f} instances/s end to end)",
        file=sys.stderr,
    )


def test_ingest_logs_no_warning_for_its_healthcheck(stack):
    # Two healthcheck intervals at least have passed since `up --wait`.
    logs = compose("logs", "--no-color", "ingest", timeout=60).stdout
    assert "WARNING" not in logs, logs[-3000:]


def test_qr_answers_c_find_from_outside_its_container(stack, tmp_path):
    out = tmp_path / "find"
    out.mkdir()
    run_in(
        [
            "/usr/bin/findscu",
            "-S",
            "-aet",
            "FINDSCU",
            "-aec",
            "SWITCHYARD_QR",
            "-X",
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            "11113",
        ],
        timeout=60,
    )
    found = {pydicom.dcmread(p).StudyInstanceUID for p in out.glob("rsp*.dcm")}
    assert set(stack.sops.values()) <= found


def crash(state: dict) -> None:
    """SIGKILL the container's main process, as a crash or the OOM killer would.

    Not `docker kill`: Docker counts that as a manual stop, after which the
    restart policy does not restart the container.
    """
    pid = state["Pid"]
    assert pid > 0, state
    # Under `init: true` the service runs as the init's child: kill the service itself.
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    os.kill(int(children[0]) if children else pid, signal.SIGKILL)


@pytest.mark.parametrize("victim", [*SERVICES, "nats"])
def test_crashed_container_comes_back_and_nothing_is_lost(stack, victim):
    before = container_state(victim)
    batch = stack.make(studies=1, series=1, per_series=5)
    crash(before)
    if victim not in ("ingest", "nats"):
        # Sent while the victim is down: the log holds the work until it is back.
        stack.send(batch)
    wait_for(
        lambda: container_state(victim)["StartedAt"] != before["StartedAt"] and healthy(victim),
        120,
        f"{victim} restarted and healthy",
    )
    assert container_state(victim)["Restarting"] is False
    if victim in ("ingest", "nats"):
        # Nothing can be received without them: sent once they are back.
        stack.send(batch)
    stack.assert_routed()


def test_down_up_keeps_log_affinity_catalog_orthanc_data(stack):
    where = stack.assert_routed()
    jsz = http_json("http://127.0.0.1:8222/jsz?streams=true")
    messages = {s["name"]: s["state"]["messages"] for a in jsz["account_details"] for s in a["stream_detail"]}
    compose("down", timeout=180)
    compose("up", "-d", "--wait", "--no-build" if offline() else "--build", timeout=UP_TIMEOUT_S)
    # The log and the KV buckets (affinity, membership) kept every message.
    jsz = http_json("http://127.0.0.1:8222/jsz?streams=true")
    after = {s["name"]: s["state"]["messages"] for a in jsz["account_details"] for s in a["stream_detail"]}
    for name, count in messages.items():
        assert after.get(name, 0) >= count, (name, count, after.get(name))
    # Orthanc data and the catalog: everything still there, on the same nodes.
    assert stack.all_routed() == where
    # Affinity: a new instance of a study sent before lands on that study's node.
    study_sop = next(iter(where))
    study_uid = stack.sops[study_sop]
    src = next(
        p for p in stack.root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == study_sop
    )
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    extra = stack.root / "after-up.dcm"
    ds.save_as(extra, enforce_file_format=True)
    stack.send([extra])
    where = stack.assert_routed()
    assert where[ds.SOPInstanceUID] == where[study_sop], study_uid
