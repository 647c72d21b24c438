"""A 3-server JetStream cluster (R3 streams) loses its stream leader, then another server, mid-stream.

Instances keep arriving the whole time (a modality resends what was refused,
as DICOM senders do); the checks: none lost, none placed or forwarded twice,
routing resumes within 5 s of each kill, and a killed server rejoins and
holds the whole log again.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from shared import events as ev
from shared import natsauth
from shared.config import load_config
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.cluster import Sender, kill_and_measure, member_last_seq, rejoin
from tests.fixtures.deploy import compose_config
from tests.fixtures.servers import log_events, make_stack, stream_leader
from tests.fixtures.util import free_port, poll, wait_for
from tests.integration.placement_helpers import all_forwarded, by_study, chains_of, scheduler_sees

pytestmark = pytest.mark.integration

# A server that dies (SIGKILL) is noticed by its raft peers only when their election
# timer runs out: 4-9 s, drawn at random and fixed in nats-server (server/raft.go,
# minElectionTimeoutDefault..maxElectionTimeoutDefault; no config option). So after
# a server is killed routing resumes within that window plus a campaign (<= 0.8 s)
# and a client reconnect. Every member leads some raft group (the meta layer, a
# stream, a consumer: ~10 groups on 3 servers), so killing a stream follower
# stalls the consumers it led just as long. A server stopped with SIGTERM hands
# its leaderships over first: routing resumes within RESUME_S.
RESUME_S = 5.0
RESUME_AFTER_LEADER_KILL_S = 9.0 + 0.8 + 2.0


async def test_cluster_loses_leader_then_another_server_and_nothing_else(live_nodes, tmp_path):
    stack = make_stack(tmp_path / "stack", live_nodes, nats_cluster=3)
    try:
        wait_for(
            lambda: all(scheduler_sees(stack, n.node.id, True) for n in live_nodes), timeout=30, what="every node live"
        )
        files = generate_studies(
            tmp_path / "corpus", studies=20, series_per_study=1, instances_per_series=30, seed=1601
        )
        # More than the three kills take to send: the sender is stopped after the last one.
        sender = Sender(stack, files)
        sender.start()
        wait_for(lambda: sender.sent >= 15, timeout=60, what="some sent")

        first = await poll(lambda: stream_leader(stack), timeout=10, what="the stream leader")
        gap1 = await kill_and_measure(stack, first, sender)
        await rejoin(stack, first)

        mark = sender.sent
        wait_for(lambda: sender.sent >= mark + 10, timeout=60, what="more sent")
        leader = await poll(lambda: stream_leader(stack), timeout=10, what="the stream leader")
        second = next(m.name for m in stack.members if m.name not in (first, leader))
        gap2 = await kill_and_measure(stack, second, sender)
        await rejoin(stack, second)

        # A planned restart (SIGTERM) of the leader: it steps down before it exits.
        mark = sender.sent
        wait_for(lambda: sender.sent >= mark + 10, timeout=60, what="more sent")
        third = await poll(lambda: stream_leader(stack), timeout=10, what="the stream leader")
        gap3 = await kill_and_measure(stack, third, sender, graceful=True)
        await rejoin(stack, third)

        sender.stop.set()
        sender.join(180)
        assert not sender.is_alive() and sender.error is None, sender.error
        files = sender.done
        studies = by_study(files)

        wait_for(lambda: all_forwarded(stack, studies), timeout=90, what="every instance forwarded")
        events = await log_events(stack)
        for kind in (ev.InstanceReceivedV1, ev.InstancePlacedV1, ev.InstanceForwardedV1):
            counts = Counter(e.sop_instance_uid for e in events if isinstance(e, kind))
            assert len(counts) == len(files), (kind.__name__, len(counts), len(files))
            dups = [s for s, c in counts.items() if c > 1]
            assert not dups, (kind.__name__, chains_of(events, dups))
        assert not any(isinstance(e, ev.InstanceDeadLetteredV1) for e in events)

        # Every server holds the same log at the end (a follower applies the last
        # entries a moment after the leader: asked until they agree).
        def same_log() -> bool:
            return len({member_last_seq(stack, m.name) for m in stack.members}) == 1

        wait_for(same_log, timeout=30, what="every server holding the same log")
        print(
            f"cluster: {len(files)} files, routing resumed {gap1:.2f}s after SIGKILL of the leader, "
            f"{gap2:.2f}s after SIGKILL of a follower, {gap3:.2f}s after SIGTERM of the leader; "
            f"{sender.resends} batches resent"
        )
        assert gap1 < RESUME_AFTER_LEADER_KILL_S and gap2 < RESUME_AFTER_LEADER_KILL_S, (gap1, gap2)
        assert gap3 < RESUME_S, gap3
    finally:
        stack.close()


# --- the compose profile `cluster`, its NATS configs run for real ----------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


async def test_compose_cluster_profile_runs_three_authenticated_members(tmp_path):
    """The profile's members, their configs as compose renders them, on loopback: one cluster, R3 for the
    services, and a server without the route password never joins."""
    password = secrets.token_hex(16)
    compose = compose_config("deploy/cluster.env", NATS_ROUTE_PASSWORD=password)
    members = [n for n in ("nats", "nats-2", "nats-3") if n in compose["services"]]
    assert len(members) == 3
    for name in ("ingest", "scheduler", "forwarder", "probe", "catalog", "nats-init"):
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items() if v is not None}
        nats_cfg = load_config(env=env).nats
        assert nats_cfg.server_urls() == ["nats://nats:4222", "nats://nats-2:4222", "nats://nats-3:4222"], name
        assert nats_cfg.replicas == 3, name
    assert {"nats-2", "nats-3"} <= compose["services"]["nats-init"]["depends_on"].keys()

    # Hostnames and container paths -> loopback ports and temp dirs; everything else as rendered.
    ports = {n: (free_port(), free_port(), free_port()) for n in members}  # client, route, monitor
    routes = compose["configs"]["nats-routes"]["content"]
    for n, (_, route, _) in ports.items():
        routes = routes.replace(f"@{n}:6222", f"@127.0.0.1:{route}")
    creds = natsauth.generate(tmp_path / "creds", load_config(env={}).nats)
    conf_text = (ROOT / "deploy" / "nats" / "jetstream-cluster.conf").read_text()
    procs = []

    def start(n: str, route_password: str) -> ls.Proc:
        d = tmp_path / n
        d.mkdir()
        (d / "routes.conf").write_text(routes.replace(password, route_password))
        (d / "auth.conf").write_text(creds.auth_conf.read_text())
        client, route, monitor = ports[n]
        (d / "nats.conf").write_text(
            conf_text.replace("store_dir: /data", f"store_dir: {json.dumps(str(d))}").replace(
                "0.0.0.0:6222", f"127.0.0.1:{route}"
            )
        )
        env = {
            **os.environ,
            "NATS_SERVER_NAME": compose["services"][n]["environment"]["NATS_SERVER_NAME"],
            "NATS_ROUTE_PASSWORD": route_password,
        }
        return ls.spawn(
            n,
            [
                str(ls.VENV_BIN / "nats-server"),
                "-c",
                str(d / "nats.conf"),
                "-a",
                "127.0.0.1",
                "-p",
                str(client),
                "-m",
                str(monitor),
            ],
            env,
            d / "log",
        )

    def jsz(n: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[n][2]}/jsz", timeout=1) as rsp:
            return json.loads(rsp.read())

    def routez(n: str) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[n][2]}/routez", timeout=1) as rsp:
            return len({r.get("remote_name") or r.get("remote_id") for r in json.loads(rsp.read())["routes"]})

    try:
        procs = [start(n, password) for n in members]
        wait_for(
            lambda: all(jsz(n).get("meta_cluster", {}).get("leader") for n in members), timeout=30, what="a meta leader"
        )
        wait_for(lambda: all(routez(n) == 2 for n in members), timeout=30, what="every member routed to the others")
        # A fourth server that does not know the password: refused, never in the cluster.
        ports["intruder"] = (free_port(), free_port(), free_port())
        compose["services"]["intruder"] = {"environment": {"NATS_SERVER_NAME": "intruder"}}
        intruder = start("intruder", "not-the-password")
        procs.append(intruder)
        wait_for(
            lambda: "Authorization Violation" in (tmp_path / "intruder" / "log").read_text(),
            timeout=20,
            what="the intruder's routes refused",
        )
        assert intruder.popen.poll() is None and all(routez(n) == 2 for n in members)
        # Unset, the password is a startup error, not an empty password.
        unset = subprocess.run(
            [str(ls.VENV_BIN / "nats-server"), "-t", "-c", str(tmp_path / "nats" / "nats.conf")],
            env={**{k: v for k, v in os.environ.items() if k != "NATS_ROUTE_PASSWORD"}, "NATS_SERVER_NAME": "nats-1"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert unset.returncode != 0 and "NATS_ROUTE_PASSWORD" in unset.stdout + unset.stderr
    finally:
        ls.stop_all(procs)
