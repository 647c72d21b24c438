"""Two scheduler replicas and two forwarders; several senders interleaving studies: one node per study."""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter

import msgspec
import pytest

from shared import events as ev
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack
from tests.fixtures.util import free_port, wait_for
from tests.integration.placement_helpers import all_forwarded, by_study, log_events, scheduler_sees

pytestmark = pytest.mark.integration


def metric_total(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


async def test_replicas_never_place_twice_and_interleaved_studies_stay_whole(live_nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", live_nodes)
    # Second scheduler and forwarder: same log, same durable consumers, their own metrics ports.
    cfg2 = msgspec.structs.replace(
        stack.cfg,
        scheduler=msgspec.structs.replace(stack.cfg.scheduler, metrics_port=free_port()),
        forwarder=msgspec.structs.replace(stack.cfg.forwarder, metrics_port=free_port()),
    )
    path2 = ls.write_config(cfg2, tmp_path / "replica.toml")
    replicas = []
    try:
        replicas = [ls.start_service(s, cfg2, path2, tmp_path / "replica") for s in ("scheduler", "forwarder")]
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        studies = by_study(
            generate_studies(tmp_path / "corpus", studies=6, series_per_study=2, instances_per_series=4, seed=4501)
        )
        # Three senders; each carries a share of every study, all at once.
        shares = [[f for files in studies.values() for f in sorted(files)[i::3]] for i in range(3)]
        codes: list[int] = []
        threads = [
            threading.Thread(target=lambda s=s, i=i: codes.append(stack.send(s, calling_ae=f"MOD{i}").returncode))
            for i, s in enumerate(shares)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert codes == [0, 0, 0]
        rows = wait_for(lambda: all_forwarded(stack, studies), timeout=90, what="every study forwarded")
        for study_uid, rs in rows.items():
            assert len({r["node_id"] for r in rs}) == 1, (study_uid, {r["node_id"] for r in rs})
        events = await log_events(stack)
        placed = Counter(e.sop_instance_uid for e in events if isinstance(e, ev.InstancePlacedV1))
        assert set(placed.values()) == {1} and len(placed) == sum(len(f) for f in studies.values())
        forwarded = Counter(e.sop_instance_uid for e in events if isinstance(e, ev.InstanceForwardedV1))
        assert set(forwarded.values()) == {1}
        # Both replicas of each service did part of the work.
        assert metric_total(stack.cfg.scheduler.metrics_port, "switchyard_scheduler_placements_total") > 0
        assert metric_total(cfg2.scheduler.metrics_port, "switchyard_scheduler_placements_total") > 0
        assert metric_total(stack.cfg.forwarder.metrics_port, "switchyard_forwarder_forwarded_total") > 0
        assert metric_total(cfg2.forwarder.metrics_port, "switchyard_forwarder_forwarded_total") > 0
    finally:
        ls.stop_all(replicas)
        stack.close()
