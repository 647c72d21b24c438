"""`./bootstrap.sh up` stops cleanly (exit 0, nothing left running) on SIGINT or SIGTERM sent to its PID."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from switchyard import stack as ls
from tests.fixtures.servers import nodes_on_free_ports, stack_config
from tests.fixtures.util import free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("command", "sig", "when"),
    [
        ("up", signal.SIGINT, "switchyard: running"),
        ("up", signal.SIGTERM, "switchyard: running"),
        ("stack", signal.SIGINT, "demo: sending"),  # in the middle of the demo
    ],
    ids=["up-SIGINT", "up-SIGTERM", "stack-demo-SIGINT"],
)
def test_bootstrap_stack_stops_cleanly_on_a_signal_to_its_pid(tmp_path, command, sig, when):
    nodes = nodes_on_free_ports()
    config = ls.write_config(stack_config(tmp_path / "data", nodes), tmp_path / "switchyard.toml")
    proc = subprocess.Popen(
        [str(ls.REPO / "bootstrap.sh"), command, "--data-dir", str(tmp_path / "data")]
        + ["--nats-monitor-port", str(free_port())],
        cwd=ls.REPO,
        env={**os.environ, "SWITCHYARD_CONFIG": str(config)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # our own group: the signal goes to the PID only, as `kill PID` sends it
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any(when in ln for ln in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)[-4000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    while True:
        try:
            seen.append(lines.get(timeout=2))
        except queue.Empty:
            break
    out = "".join(seen)
    assert rc == 0, out[-4000:]
    assert "error: interrupted" not in out and "Traceback" not in out, out[-4000:]
    if command == "stack":  # stopped in the middle of the demo, not after it
        assert "demo: all" not in out, out[-4000:]
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
