"""A loaded node (a real queue of Orthanc jobs) gets measurably less new work."""

from __future__ import annotations

import json
import socket
from collections import Counter

import pytest

from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import wait_for
from tests.integration.placement_helpers import all_forwarded, by_study, scheduler_sees

pytestmark = pytest.mark.integration


def score(stack, node_id: str) -> float:
    return stack.metric("scheduler", "switchyard_scheduler_node_score", f'node="{node_id}"')


def test_node_with_a_job_queue_gets_less_new_work(live_nodes, tmp_path):
    loaded = live_nodes[0]
    others = [n for n in live_nodes if n is not loaded]
    # A DICOM peer that takes the TCP connection and never answers: each store job to it
    # runs until Orthanc's SCU timeout, and the rest queue behind ConcurrentJobs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    jobs: list[str] = []
    stack = make_stack(tmp_path / "stack", live_nodes)
    try:
        seed = generate_studies(tmp_path / "seed", studies=1, series_per_study=1, instances_per_series=1, seed=4601)
        assert ls.storescu("127.0.0.1", loaded.node.dicom_port, loaded.node.ae_title, seed).returncode == 0
        client = loaded.client
        client._request(
            "/modalities/blackhole",
            json.dumps({"AET": "BLACKHOLE", "Host": "127.0.0.1", "Port": blackhole.getsockname()[1]}).encode(),
            "PUT",
        )
        instance = client.get_json("/instances")[0]
        for _ in range(20):
            jobs.append(
                client.post_json("/modalities/blackhole/store", {"Resources": [instance], "Asynchronous": True})["ID"]
            )
        assert client.pending_jobs() >= 15
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        wait_for(
            lambda: score(stack, loaded.node.id) > max(score(stack, n.node.id) for n in others) + 10,
            timeout=30,
            what="scheduler sees the job queue",
        )

        studies = by_study(
            generate_studies(tmp_path / "corpus", studies=6, series_per_study=1, instances_per_series=2, seed=4602)
        )
        for files in studies.values():
            assert stack.send(files).returncode == 0
        rows = wait_for(lambda: all_forwarded(stack, studies), timeout=60, what="studies forwarded")
        per_node = Counter(r["node_id"] for rs in rows.values() for r in rs)
        assert all(per_node[loaded.node.id] < per_node[n.node.id] for n in others), per_node
    finally:
        for job in jobs:
            try:
                loaded.client.post_json(f"/jobs/{job}/cancel", {})
            except Exception:  # noqa: BLE001 - a finished job cannot be cancelled
                pass
        stack.close()
        blackhole.close()
