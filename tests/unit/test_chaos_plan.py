"""The chaos command's fault schedule and the local stack's supervisor (real child processes)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading

import pytest

from switchyard import stack as ls
from switchyard.chaos import Fault, parse_faults


def test_faults_parse_seconds_percent_and_durations_in_the_given_order():
    assert parse_faults("kill:ingest@5, term:nats@30%,stop:node2@40+30") == [
        Fault("kill", "ingest", 5.0),
        Fault("term", "nats", 30.0, percent=True),
        Fault("stop", "node2", 40.0, 30.0),
    ]
    assert str(Fault("stop", "node2", 62.0, 8.0, percent=True)) == "stop:node2@62%+8"
    assert parse_faults("") == []


@pytest.mark.parametrize("text", ["kill:ingest", "boom:ingest@5", "stop:node2@5", "kill:ingest@-1"])
def test_a_malformed_fault_is_refused_with_the_expected_form(text):
    with pytest.raises(ValueError, match="expected kill|needs"):
        parse_faults(text)


def _sleeper(wait: bool) -> ls.Proc:
    return ls.Proc("sleeper", subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))


def test_supervisor_restarts_a_killed_child_with_backoff_and_logs_it():
    log = io.StringIO()
    sup = ls.Supervisor(log)
    stop = threading.Event()
    try:
        first = sup.add("sleeper", _sleeper).popen.pid
        sup.start_thread(stop)
        os.kill(first, signal.SIGKILL)
        ls.wait_until(
            lambda: sup.procs["sleeper"].popen.pid != first and sup.procs["sleeper"].popen.poll() is None,
            10,
            "restarted",
        )
        assert "sleeper exited with code -9; restarting in 0.5s (restart 1)" in log.getvalue()
        # A held process stays down until released.
        held = sup.hold("sleeper")
        held.stop()
        for _ in range(3):
            sup.check()
        assert sup.procs["sleeper"].popen.poll() is not None
        assert sup.release("sleeper").popen.poll() is None
    finally:
        stop.set()
        sup.stop_all()
