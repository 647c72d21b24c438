"""`switchyard send` against the real stack: every file acknowledged or named; re-sends audited."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pydicom
import pytest

from shared.dicomfile import read_header
from switchyard import stack as ls
from switchyard.corpus import bundled_test_files, generate_studies
from tests.factories import lying_file
from tests.fixtures.servers import Stack, make_stack
from tests.fixtures.util import poll, wait_for

pytestmark = pytest.mark.integration

SUMMARY = re.compile(r"^send: (\d+) files: sent (\d+), ok (\d+), warning (\d+), refused (\d+), failed (\d+)", re.M)


def send(stack: Stack, *args: str | Path, calling_ae: str = "TESTSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "switchyard",
            "--config",
            str(stack.config_path),
            "send",
            "--calling-ae",
            calling_ae,
            *map(str, args),
        ],
        cwd=ls.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def summary(result: subprocess.CompletedProcess[str]) -> tuple[int, ...]:
    m = SUMMARY.search(result.stdout)
    assert m, result.stdout[-3000:] + result.stderr[-3000:]
    return tuple(int(x) for x in m.groups())


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


async def test_a_folder_of_the_demo_corpus_is_acknowledged_file_by_file(stack, tmp_path):
    corpus = tmp_path / "corpus"
    files = generate_studies(corpus / "generated", studies=2, series_per_study=2, instances_per_series=3, seed=151)
    files += bundled_test_files(corpus / "pydicom")
    result = send(stack, corpus)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary(result) == (len(files), len(files), len(files), 0, 0, 0)
    for path in files:
        assert re.search(rf"^{re.escape(str(path))}: 0x0000 success$", result.stdout, re.M), path
    # Acknowledged means recorded: every instance is on the log.
    wanted = {sop_uid(p) for p in files}
    await poll(lambda: _received_all(stack, wanted), timeout=60, what="a received event for every acknowledged file")
    # No patient value on any line the command printed.
    header = read_header(files[0])
    for value in (header.get("PatientName"), header.get("PatientID")):
        assert not value or value not in result.stdout + result.stderr


async def _received_all(stack: Stack, wanted: set[str]) -> bool:
    return wanted <= {e.sop_instance_uid for e in await stack.received_events()}


async def test_a_refused_file_makes_the_exit_code_non_zero_and_is_named(stack, tmp_path):
    folder = tmp_path / "mixed"
    good = generate_studies(folder / "good", studies=1, series_per_study=1, instances_per_series=3, seed=152)
    (folder / "bad").mkdir()
    bad = lying_file(good[0], folder / "bad" / "lying.dcm")
    result = send(stack, folder)
    assert result.returncode == 1, result.stdout[-3000:]
    assert summary(result) == (4, 4, 3, 0, 1, 0)
    assert re.search(rf"^{re.escape(str(bad))}: 0xC001 refused: .*will not help", result.stdout, re.M), result.stdout


async def test_nothing_listening_is_retried_then_failed(stack, tmp_path):
    from tests.fixtures.util import free_port

    path = generate_studies(tmp_path / "c", studies=1, series_per_study=1, instances_per_series=1, seed=153)[0]
    result = subprocess.run(
        [sys.executable, "-m", "switchyard", "--config", str(stack.config_path), "send"]
        + ["--port", str(free_port()), "--retries", "2", str(path)],
        cwd=ls.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert summary(result) == (1, 0, 0, 0, 0, 1)
    assert result.stderr.count("retry ") == 2, result.stderr
    assert f"{path}: ------ failed: association failed" in result.stdout


async def test_a_resend_from_another_ae_is_audited_and_not_placed_again(stack, tmp_path):
    path = generate_studies(tmp_path / "c", studies=1, series_per_study=1, instances_per_series=1, seed=154)[0]
    uid = sop_uid(path)
    assert send(stack, path, calling_ae="FIRSTAE").returncode == 0
    assert send(stack, path, calling_ae="SECONDAE").returncode == 0
    # Twice in one association: one re-send record for it (deduplicated per association).
    twice = tmp_path / "twice"
    twice.mkdir()
    shutil.copy(path, twice / "a.dcm")
    shutil.copy(path, twice / "b.dcm")
    result = send(stack, twice, calling_ae="THIRDAE")
    assert result.returncode == 0 and summary(result)[2] == 2, result.stdout
    # A later instance placed means the scheduler has read past the re-sends.
    later = generate_studies(tmp_path / "d", studies=1, series_per_study=1, instances_per_series=1, seed=155)[0]
    assert send(stack, later).returncode == 0

    def trail_of(sop: str) -> list[dict]:
        try:
            return stack.catalog(f"/api/instances/{sop}/trail")["events"]
        except OSError:
            return []

    def settled() -> list[dict] | None:
        events = trail_of(uid)
        kinds = [e["type"] for e in events]
        done = kinds.count("instance.resent.v1") >= 2 and "instance.placed.v1" in kinds
        return events if done and any(e["type"] == "instance.placed.v1" for e in trail_of(sop_uid(later))) else None

    events = await poll(lambda: _async(settled), timeout=60, what="re-sends in the trail and the later placement")
    received = [e for e in events if e["type"] == "instance.received.v1"]
    resent = [e for e in events if e["type"] == "instance.resent.v1"]
    assert [e["calling_ae"] for e in received] == ["FIRSTAE"]
    assert sorted(e["calling_ae"] for e in resent) == ["SECONDAE", "THIRDAE"]
    assert all(e["peer_address"] == "127.0.0.1" and e["peer_port"] > 0 and e["same_content"] for e in resent)
    assert len({e["association_id"] for e in resent}) == 2
    assert [e["type"] for e in events].count("instance.placed.v1") == 1
    assert "from 'SECONDAE' at 127.0.0.1:" in stack.log("ingest")


async def _async(fn):
    return fn()


def test_nodes_commands_are_quiet_on_success(stack):
    """Closing the NATS connection is not a disconnection worth a warning."""
    for args in (["nodes", "list"], ["nodes", "undrain", stack.cfg.nodes[0].id, "--reason", "test"]):
        result = subprocess.run(
            [sys.executable, "-m", "switchyard", "--config", str(stack.config_path), *args],
            cwd=ls.REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr
    assert stack.cfg.nodes[0].id in result.stdout


def test_out_of_resources_is_retried_until_the_ingest_can_take_it(ingest_only, tmp_path):
    """NATS down: ingest answers 0xA701; send retries with backoff and succeeds once NATS is back."""
    path = generate_studies(tmp_path / "c", studies=1, series_per_study=1, instances_per_series=1, seed=156)[0]
    ingest_only.stop_nats()
    proc = subprocess.Popen(
        [sys.executable, "-m", "switchyard", "--config", str(ingest_only.config_path), "send"]
        + ["--retries", "8", "--calling-ae", "TESTSCU", str(path)],
        cwd=ls.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                (ingest_only.metric("ingest", "switchyard_ingest_cstore_status_total", 'status="0xA701"') or 0) >= 1
            ),
            timeout=60,
            what="ingest answered out of resources",
        )
        ingest_only.start_nats()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert re.search(rf"^{re.escape(str(path))}: 0x0000 success \(after \d+ retries\)$", out, re.M), out


def test_out_of_resources_after_every_retry_is_named_and_fails(ingest_only, tmp_path):
    path = generate_studies(tmp_path / "c", studies=1, series_per_study=1, instances_per_series=1, seed=157)[0]
    ingest_only.stop_nats()
    result = send(ingest_only, "--retries", "1", path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary(result) == (1, 1, 0, 0, 1, 0)
    assert f"{path}: 0xA701 refused: out of resources (a later retry may help) (after 1 retries)" in result.stdout


def test_tls_as_the_ingest_config_says(orthanc_nodes, pki, tmp_path):
    """The config's ingest serves mutual TLS: send verifies it against ingest.tls_ca_file and presents
    the client certificate it is given; without one there is no association, and the file is named."""

    def configure(cfg):
        tls = {"tls_cert_file": str(pki["server_crt"]), "tls_key_file": str(pki["server_key"])}
        return msgspec.structs.replace(
            cfg, ingest=msgspec.structs.replace(cfg.ingest, tls_ca_file=str(pki["ca"]), network_timeout_s=5.0, **tls)
        )

    stack = make_stack(tmp_path / "stack", orthanc_nodes, ("ingest",), configure)
    try:
        path = generate_studies(tmp_path / "c", studies=1, series_per_study=1, instances_per_series=1, seed=158)[0]
        ok = send(stack, "--tls-cert", pki["client_crt"], "--tls-key", pki["client_key"], path)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"{path}: 0x0000 success" in ok.stdout
        refused = send(stack, "--retries", "0", path)
        assert refused.returncode == 1 and f"{path}: ------ failed: association" in refused.stdout, refused.stdout
        plain = send(stack, "--no-tls", "--retries", "0", path)
        assert plain.returncode == 1, plain.stdout
    finally:
        stack.close()
