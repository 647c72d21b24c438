"""Several ingest processes on one port (ingest.workers, SO_REUSEPORT)."""

from __future__ import annotations

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import free_port, wait_for

pytestmark = pytest.mark.integration

SENDERS = 6


def port_pair() -> int:
    """A free port whose next one is free too (worker 1 serves metrics there)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def test_workers_share_the_port_and_a_dead_worker_stops_the_service(orthanc_nodes, tmp_path):
    metrics = port_pair()

    def configure(cfg):
        # All SENDERS come as one peer and the kernel may give one worker most of them.
        return msgspec.structs.replace(
            cfg,
            ingest=msgspec.structs.replace(
                cfg.ingest, workers=2, metrics_port=metrics, max_associations_per_peer=SENDERS
            ),
        )

    stack = make_stack(tmp_path / "stack", orthanc_nodes, ("ingest",), configure)
    try:
        parent = stack.services["ingest"].popen.pid
        wait_for(lambda: ls.http_ok(f"http://127.0.0.1:{metrics + 1}/metrics"), timeout=30, what="worker 1 ready")
        [worker] = children(parent)
        files = generate_studies(
            tmp_path / "corpus", studies=SENDERS, series_per_study=1, instances_per_series=3, seed=6161
        )
        chunks = [files[i::SENDERS] for i in range(SENDERS)]
        with ThreadPoolExecutor(SENDERS) as pool:
            results = list(pool.map(lambda c: stack.send(c, calling_ae="WORKERS"), chunks))
        assert all(r.returncode == 0 for r in results), [r.stdout + r.stderr for r in results if r.returncode]
        assert len({e.sop_instance_uid for e in await stack.received_events()}) == len(files)

        # Each worker counts what it accepted; together, every instance once.
        counted = [stack.metric("ingest", "switchyard_ingest_instances_total", worker=w) for w in (0, 1)]
        assert None not in counted and sum(c or 0.0 for c in counted) == len(files), counted

        # A worker that dies takes the service down loudly (a supervisor restarts it),
        # rather than leaving half the port's associations to a dead process.
        os.kill(worker, signal.SIGKILL)
        proc = stack.services["ingest"].popen
        wait_for(lambda: proc.poll() is not None, timeout=30, what="ingest exits after its worker died")
        assert proc.returncode != 0
        assert "ingest worker 1 exited" in stack.log("ingest")
    finally:
        stack.close()
