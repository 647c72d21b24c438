"""Helpers shared by the placement tests: read the log, run the nodes CLI, look at nodes."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pydicom

from shared import events as ev
from shared.bus import SUBJECT_RECEIVED
from switchyard.stack import REPO
from tests.fixtures.servers import log_events  # noqa: F401 - the placement tests take it from here
from tests.fixtures.util import poll


def nodes_cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", "--config", str(stack.config_path), "nodes", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


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
        got = [(d.seq, d.event) async for d in bus.replay(SUBJECT_RECEIVED)
               if isinstance(d.event, ev.InstanceReceivedV1)]
        return got if len(got) == n else None

    return await poll(ready, timeout=30, what=f"{n} received events")
