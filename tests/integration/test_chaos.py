"""The CI-sized chaos run (issue #13): every fault once while 3 DCMTK senders send, then the audit.

Runs ``switchyard chaos`` as an operator would (its own stack under the
supervisor, real kill -9 / SIGTERM of each process, a real nats-server restart,
an Orthanc node stopped and started) and asserts the issue's targets on the
report: 0 lost, 0 duplicated, 0 studies split except by a node that went down,
0 final dead letters, and the audit settles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from shared.config import NodeConfig
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.fixtures.servers import NODE_PASSWORD, make_stack, stack_config
from tests.fixtures.util import free_port

pytestmark = pytest.mark.integration

INSTANCES = 2000
# Every fault once (ingest twice), each when that share of the corpus is acknowledged, so all land
# while the senders send whatever the machine's speed; node2 stays down for 8 s.
FAULTS = (
    "kill:ingest@5%,kill:scheduler@12%,kill:forwarder@20%,kill:probe@28%,kill:catalog@36%,term:nats@44%,"
    "kill:ingest@55%,stop:node2@62%+8,kill:nats@75%"
)


def own_nodes_config(data_dir):
    """A test config whose three nodes the command under test starts itself (free ports)."""
    nodes = [
        NodeConfig(
            id=f"node{i}",
            dicom_port=free_port(),
            ae_title=f"NODE{i}",
            rest_url=f"http://127.0.0.1:{free_port()}",
            password=NODE_PASSWORD,
        )
        for i in (1, 2, 3)
    ]
    return stack_config(data_dir, nodes)


def test_chaos_run_loses_duplicates_splits_and_dead_letters_nothing(tmp_path):
    cfg = own_nodes_config(tmp_path / "data")
    # A delivery whose ack a NATS restart lost comes back after ack_wait: short, so the run fits CI.
    cfg = msgspec.structs.replace(cfg, forwarder=msgspec.structs.replace(cfg.forwarder, ack_wait_s=10.0))
    config = ls.write_config(cfg, tmp_path / "switchyard.toml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "switchyard",
            "--config",
            str(config),
            "chaos",
            "--instances",
            str(INSTANCES),
            "--senders",
            "3",
            "--faults",
            FAULTS,
            "--seed",
            "13",
            "--data-dir",
            str(tmp_path / "data"),
            "--keep-ports",
            "--settle-timeout",
            "90",
            "--send-timeout",
            "180",
            "--json",
            str(tmp_path / "report.json"),
        ],
        cwd=ls.REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["instances"] == INSTANCES, out[-4000:]
    # Every fault happened and the supervisor brought each killed process back.
    restarted = " ".join(report["restarts"])
    for target in ("ingest", "scheduler", "forwarder", "probe", "catalog", "nats"):
        assert target in restarted, out[-4000:]
    assert report["acknowledged"] == INSTANCES, out[-4000:]
    assert report["received_duplicated"] == 0, out[-4000:]
    assert (report["lost"], report["duplicated"], report["split"], report["dead_lettered"]) == (0, 0, 0, 0), out[-4000:]
    assert report["settled"] and report["catalog_mismatch"] == 0, out[-4000:]
    assert result.returncode == 0, out[-4000:]
    # Nothing left running.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers


@pytest.mark.parametrize("how", ["term", "kill"])
def test_catalog_resumes_within_2s_after_a_nats_restart(orthanc_nodes, tmp_path, how):
    stack = make_stack(tmp_path / "stack", orthanc_nodes, services=("ingest", "catalog"))
    try:
        first, second = generate_studies(
            tmp_path / "corpus", studies=2, series_per_study=1, instances_per_series=1, seed=int(time.time())
        )
        assert stack.send([first]).returncode == 0
        ls.wait_until(lambda: len(stack.catalog("/api/instances?limit=10")) == 1, 10, "catalog has the first")
        if how == "kill":
            assert stack.nats is not None
            stack.nats.kill()
            stack.nats = None
        else:
            stack.stop_nats()
        stack.start_nats()
        # Ingest reconnects and publishes; the time counted is from its success to the catalog row.
        ls.wait_until(lambda: stack.send([second]).returncode == 0, 20, "ingest stores again")
        sent = time.monotonic()
        ls.wait_until(lambda: len(stack.catalog("/api/instances?limit=10")) == 2, 30, "catalog has the second")
        assert time.monotonic() - sent < 2.0, stack.diagnostics()
    finally:
        stack.close()


def test_stack_restarts_a_crashed_service_and_keeps_probe_files_in_its_data_dir(tmp_path):
    cfg = own_nodes_config(tmp_path / "data")
    # Relative paths, as in the default config: --data-dir must place them.
    cfg = msgspec.structs.replace(
        cfg,
        probe=msgspec.structs.replace(
            cfg.probe, db_path="var/probe.duckdb", catalog_db_path="var/probe-catalog.duckdb"
        ),
    )
    config = ls.write_config(cfg, tmp_path / "switchyard.toml")
    data = tmp_path / "elsewhere"
    log = tmp_path / "stack.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "switchyard",
                "--config",
                str(config),
                "stack",
                "--data-dir",
                str(data),
                "--nats-monitor-port",
                str(free_port()),
            ],
            cwd=ls.REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        ls.wait_until(lambda: "switchyard: running" in log.read_text(), 120, "stack up", proc)
        assert (data / "probe.duckdb").exists() and (data / "probe-catalog.duckdb").exists()

        def forwarder_pid() -> int | None:
            found = subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "services.forwarder"], capture_output=True, text=True
            ).stdout.split()
            return int(found[0]) if found else None

        first = forwarder_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        ls.wait_until(
            lambda: "forwarder exited with code -9; restarting" in log.read_text(), 10, "restart logged", proc
        )
        ls.wait_until(
            lambda: (
                forwarder_pid() not in (None, first)
                and ls.http_ok(f"http://127.0.0.1:{cfg.forwarder.metrics_port}/metrics")
            ),
            60,
            "forwarder back",
            proc,
        )
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
