"""Membership at run time through the command line: drain, add, remove; no restart."""

from __future__ import annotations

import pytest

from shared import events as ev
from switchyard.corpus import generate_studies
from tests.fixtures.servers import make_stack, new_orthanc_node
from tests.fixtures.util import wait_for
from tests.integration.placement_helpers import all_forwarded, by_study, log_events, nodes_cli, scheduler_sees

pytestmark = pytest.mark.integration


async def test_drain_add_remove_from_the_command_line(live_nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", live_nodes)
    extra = new_orthanc_node(4, tmp_path / "node4")
    try:
        ids = [n.node.id for n in live_nodes]
        wait_for(lambda: all(scheduler_sees(stack, i, True) for i in ids), timeout=30, what="every node live")
        old = by_study(
            generate_studies(tmp_path / "old", studies=1, series_per_study=1, instances_per_series=3, seed=4301)
        )
        assert stack.send(next(iter(old.values()))).returncode == 0
        (old_rows,) = wait_for(lambda: all_forwarded(stack, old), timeout=60, what="old study").values()
        drained_id = old_rows[0]["node_id"]
        drained = next(n for n in live_nodes if n.node.id == drained_id)

        result = nodes_cli(stack, "drain", drained_id)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: scheduler_sees(stack, drained_id, False), timeout=20, what="drained node out")
        new = by_study(
            generate_studies(tmp_path / "new", studies=4, series_per_study=1, instances_per_series=2, seed=4302)
        )
        for files in new.values():
            assert stack.send(files).returncode == 0
        rows = wait_for(lambda: all_forwarded(stack, new), timeout=60, what="new studies")
        assert drained_id not in {r["node_id"] for rs in rows.values() for r in rs}
        # The drained node's study is still readable there.
        assert {r["sop_instance_uid"] for r in old_rows} <= drained.client.sop_instance_uids()

        # A fourth node joins at run time: probe watches it, scheduler places on it, a forwarder worker appears.
        extra.start()
        n4 = extra.node
        result = nodes_cli(
            stack,
            "add",
            n4.id,
            "--host",
            n4.host,
            "--dicom-port",
            str(n4.dicom_port),
            "--ae-title",
            n4.ae_title,
            "--rest-url",
            n4.rest_url,
            "--username",
            n4.username,
        )
        assert result.returncode == 0, result.stderr
        assert (
            nodes_cli(stack, "add", n4.id, "--dicom-port", "1", "--ae-title", "X", "--rest-url", "http://x").returncode
            == 1
        ), "adding an existing node is refused"
        wait_for(lambda: scheduler_sees(stack, n4.id, True), timeout=30, what="added node live")
        for i in ids:
            if i != drained_id:
                assert nodes_cli(stack, "drain", i).returncode == 0
        wait_for(lambda: not any(scheduler_sees(stack, i, True) for i in ids), timeout=20, what="old nodes out")
        only = by_study(
            generate_studies(tmp_path / "only", studies=1, series_per_study=1, instances_per_series=2, seed=4303)
        )
        assert stack.send(next(iter(only.values()))).returncode == 0
        rows = wait_for(lambda: all_forwarded(stack, only), timeout=60, what="study on the added node")
        (rs,) = rows.values()
        assert {r["node_id"] for r in rs} == {n4.id}
        assert {r["sop_instance_uid"] for r in rs} <= extra.client.sop_instance_uids()

        for i in ids:
            assert nodes_cli(stack, "undrain", i).returncode == 0
        assert nodes_cli(stack, "remove", n4.id).returncode == 0
        assert nodes_cli(stack, "drain", "nosuchnode").returncode == 1
        wait_for(lambda: all(scheduler_sees(stack, i, True) for i in ids), timeout=20, what="undrained")
        listing = nodes_cli(stack, "list").stdout
        states = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
        assert states == {**{i: "active" for i in ids}, n4.id: "removed"}, listing
        kinds = [(e.node_id, e.state) for e in await log_events(stack) if isinstance(e, ev.NodeStateChangedV1)]
        assert (drained_id, "drained") in kinds and (n4.id, "added") in kinds and (n4.id, "removed") in kinds
    finally:
        stack.close()
        extra.stop()
