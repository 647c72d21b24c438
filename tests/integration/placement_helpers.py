"""Helpers shared by the placement tests: read the log, run the nodes CLI, look at nodes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pydicom

from shared import events as ev
from shared.bus import SUBJECT_RECEIVED, Bus
from switchyard.corpus import generate_studies
from switchyard.stack import REPO
from tests.fixtures.servers import log_events, make_stack  # noqa: F401 - the placement tests take log_events from here
from tests.fixtures.util import poll


def nodes_cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "switchyard", "--config", str(stack.config_path), "nodes", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def scheduler_sees(stack, node_id: str, live: bool) -> bool:
    return stack.metric("scheduler", "switchyard_scheduler_node_live", f'node="{node_id}"') == float(live)


def by_study(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        out[pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID].append(f)
    return dict(out)


def study_rows(stack, study_uid: str) -> list[dict]:
    return stack.catalog(f"/api/instances?study_uid={study_uid}&limit=10000")


def all_forwarded(stack, studies: dict[str, list[Path]]) -> dict[str, list[dict]]:
    """Catalog rows per study once every instance is delivered (forwarded, or
    already verified by the probe), else {}."""
    out = {}
    for study_uid, files in studies.items():
        rows = study_rows(stack, study_uid)
        if len(rows) != len(files) or any(r["state"] not in ("forwarded", "verified") for r in rows):
            return {}
        out[study_uid] = rows
    return out


async def received_with_seq(bus, n: int) -> list:
    """The log's ``n`` received events with their stream sequences, once all are there
    (tests that stand in for the scheduler place them themselves)."""

    async def ready():
        got = [
            (d.seq, d.event) async for d in bus.replay(SUBJECT_RECEIVED) if isinstance(d.event, ev.InstanceReceivedV1)
        ]
        return got if len(got) == n else None

    return await poll(ready, timeout=30, what=f"{n} received events")


@contextlib.asynccontextmanager
async def standing_in_for_the_scheduler(
    tmp_path: Path, nodes: list, instances: int, seed: int, services=("ingest", "forwarder"), configure=None
):
    """``nodes`` started, a stack without scheduler (and probe), ``instances`` sent and received;
    yields (stack, bus, [(seq, received)]): the test places them itself, as the scheduler would.
    Everything is stopped on the way out."""
    stack = bus = None
    try:
        for n in nodes:
            n.start()
        stack = make_stack(tmp_path / "stack", nodes, services=services, configure=configure)
        files = generate_studies(
            tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=instances, seed=seed
        )
        assert stack.send(files).returncode == 0
        bus = await Bus.connect(stack.cfg.nats, "test-scheduler", identity="harness")  # writes what the scheduler would
        yield stack, bus, await received_with_seq(bus, instances)
    finally:
        if bus is not None:
            await bus.close()
        if stack is not None:
            stack.close()
        for n in nodes:
            n.stop()


def route_one_study(stack, tmp_path, seed: int) -> None:
    files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=seed)
    assert stack.send(files).returncode == 0
    studies = by_study(files)
    deadline = time.monotonic() + 60
    while not all_forwarded(stack, studies) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all_forwarded(stack, studies), stack.diagnostics()


def chains_of(events, uids, limit: int = 3) -> str:
    """The log's events about ``uids`` (the first ``limit``), one line each: a failure message
    that shows how an instance came to be placed or forwarded twice (UIDs and nodes only)."""
    skip = {"traceparent", "tracestate", "candidates", "blob_key", "dataset_digest", "sop_class_uid"}
    skip |= {"transfer_syntax_uid", "study_instance_uid", "sop_instance_uid"}
    lines = []
    for uid in list(uids)[:limit]:
        lines.append(f"-- {uid}")
        for e in events:
            if getattr(e, "sop_instance_uid", None) == uid:
                fields = {k: getattr(e, k) for k in e.__struct_fields__ if k not in skip}
                lines.append(f"   {type(e).__name__} {fields}")
    return "\n".join(lines)
