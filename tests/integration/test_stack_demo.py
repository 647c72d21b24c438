"""README command 1 stays true: `switchyard stack --demo` starts everything and routes the demo."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from switchyard import stack as ls
from tests.fixtures.servers import nodes_on_free_ports, stack_config
from tests.fixtures.util import free_port

pytestmark = pytest.mark.integration


def test_stack_routes_the_demo_and_stops_cleanly(tmp_path):
    nodes = nodes_on_free_ports()
    config = ls.write_config(stack_config(tmp_path / "data", nodes), tmp_path / "switchyard.toml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "switchyard",
            "--config",
            str(config),
            "stack",
            "--demo",
            "--exit-after-demo",
            "--data-dir",
            str(tmp_path / "data"),
            "--nats-monitor-port",
            str(free_port()),
        ],
        cwd=ls.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    sent = re.search(r"demo: sending (\d+) instances in (\d+) studies", out)
    assert sent, out[-4000:]
    assert f"demo: all {sent.group(1)} instances delivered" in out
    rows = re.findall(r"^(\d[\d.]+) +\S+ +(\d+)  (node\d)$", out, flags=re.M)
    # A node for every study, and the instance counts add up.
    assert len(rows) == int(sent.group(2))
    assert sum(int(n) for _, n, _ in rows) == int(sent.group(1))
    # Nothing left running: every child was stopped by the supervisor.
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
