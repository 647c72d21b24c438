"""Two of every service at once, one of them killed mid-stream: nothing lost, nothing twice.

Ingest: two workers behind one port (SO_REUSEPORT). Schedulers and forwarders:
replicas sharing the durable consumers (JetStream gives each message to one).
Probes: both verify every placement; the outcome's id is deterministic, so
JetStream records it once. Catalogs: each folds the whole log into its own
DuckDB file.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections import Counter

import msgspec
import pytest

from shared import events as ev
from switchyard.corpus import generate_studies
from tests.fixtures.servers import OPERATOR_TOKEN, log_events, make_stack
from tests.fixtures.util import poll, wait_for
from tests.integration.placement_helpers import by_study, chains_of, scheduler_sees

pytestmark = pytest.mark.integration


def metric_total(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def catalog_states(port: int, token: str, studies) -> dict[str, str]:
    """sop -> state as one catalog instance sees it."""
    out = {}
    for study_uid in studies:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/instances?study_uid={study_uid}&limit=10000",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=5) as rsp:
            out.update({r["sop_instance_uid"]: r["state"] for r in json.loads(rsp.read())})
    return out


async def test_two_of_each_service_route_everything_once(live_nodes, tmp_path):
    def two_ingest_workers(cfg):
        return msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(cfg.ingest, workers=2))

    stack = make_stack(tmp_path / "stack", live_nodes, configure=two_ingest_workers)
    try:
        for service in ("scheduler", "forwarder", "probe", "catalog"):
            stack.start_replica(service, 2)
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        files = generate_studies(tmp_path / "corpus", studies=8, series_per_study=2, instances_per_series=10, seed=1602)
        studies = by_study(files)
        # Three modalities at once, each with a share of every study.
        shares = [[f for fs in studies.values() for f in sorted(fs)[i::3]] for i in range(3)]
        codes: list[int] = []
        senders = [
            threading.Thread(target=lambda s=s, i=i: codes.append(stack.send(s, calling_ae=f"MOD{i}").returncode))
            for i, s in enumerate(shares)
        ]
        for t in senders:
            t.start()

        # Mid-stream, once both have worked: SIGKILL the first scheduler and the second forwarder.
        first, second = stack.cfg, stack.replica_cfgs
        wait_for(
            lambda: (
                metric_total(first.scheduler.metrics_port, "switchyard_scheduler_placements_total") > 0
                and metric_total(second["scheduler-2"].scheduler.metrics_port, "switchyard_scheduler_placements_total")
                > 0
                and metric_total(first.forwarder.metrics_port, "switchyard_forwarder_forwarded_total") > 0
                and metric_total(second["forwarder-2"].forwarder.metrics_port, "switchyard_forwarder_forwarded_total")
                > 0
            ),
            timeout=90,
            what="both schedulers and both forwarders at work",
        )
        stack.services.pop("scheduler").kill()
        stack.services.pop("forwarder-2").kill()

        for t in senders:
            t.join(180)
        assert codes == [0, 0, 0]

        async def every_instance_verified():
            got = {e.sop_instance_uid for e in await log_events(stack, ev.InstanceVerifiedV1)}
            return len(got) == len(files)

        await poll(every_instance_verified, timeout=120, interval=0.5, what="every instance verified")
        events = await log_events(stack)
        for kind in (ev.InstanceReceivedV1, ev.InstancePlacedV1, ev.InstanceForwardedV1, ev.InstanceVerifiedV1):
            counts = Counter(e.sop_instance_uid for e in events if isinstance(e, kind))
            assert len(counts) == len(files), (kind.__name__, len(counts))
            dups = [s for s, c in counts.items() if c > 1]
            assert not dups, (kind.__name__, chains_of(events, dups))
        nodes_of_study: dict[str, set[str]] = {}
        for e in events:
            if isinstance(e, ev.InstanceForwardedV1):
                nodes_of_study.setdefault(e.study_instance_uid, set()).add(e.node_id)
        assert all(len(n) == 1 for n in nodes_of_study.values()), nodes_of_study

        # Both ingest workers, both probes took part; both catalogs hold every instance, verified.
        # The kernel spreads associations over the workers by a hash of each connection (SO_REUSEPORT):
        # with a handful of senders one worker may get them all, so only the sum is certain.
        per_worker = [stack.metric("ingest", "switchyard_ingest_instances_total", worker=w) or 0 for w in (0, 1)]
        assert sum(per_worker) == len(files), per_worker
        for port in (first.probe.metrics_port, second["probe-2"].probe.metrics_port):
            assert metric_total(port, "switchyard_probe_verifications_total") > 0, port
        for port in (first.catalog.http_port, second["catalog-2"].catalog.http_port):

            def complete(port=port) -> bool:
                states = catalog_states(port, OPERATOR_TOKEN, studies)
                return len(states) == len(files) and set(states.values()) == {"verified"}

            wait_for(complete, timeout=30, what=f"every instance verified in the catalog on port {port}")
    finally:
        stack.close()
