"""No patient value in any log, /metrics or span; no forged log line; owner-only files.

A whole stack (console span exporter on, every service's output captured in
its log file) is fed studies carrying sentinel patient values (non-ASCII and
control characters), a malformed dataset whose PatientID pydicom cannot
convert (its error text used to carry the raw bytes), non-DICOM bytes, an
A-ASSOCIATE-RQ whose calling AE holds a newline, and HTTP requests with
patient fields in the query string, well-formed and malformed. Then every log,
every /metrics page and every exported span is searched for each sentinel in
the forms a formatter could print it (raw, escaped, repr, JSON, bytes).
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from shared.logfmt import escape
from switchyard import stack as ls
from switchyard.corpus import generate_studies
from tests.factories import associate_rq, store_pdus
from tests.fixtures.servers import OPERATOR_TOKEN, Stack, make_stack
from tests.fixtures.util import wait_for

pytestmark = pytest.mark.integration

# Each holds an ASCII marker no other value in the stack contains: whatever a
# formatter does to the rest (escaping, repr, bytes), the marker survives.
NAME = "Qxzentinel^Jörg\nINJECTED\x1b[31m"
PATIENT_ID = "QXPID-Ω\r\n77"
ACCESSION = "QXACC\x07ß9"
BIRTH_DATE = "18770707"
BAD_PATIENT_ID = b"QXRAW1"  # sent as a UL value of 6 bytes: pydicom cannot convert it
MARKERS = ("Qxzentinel", "QXPID", "QXACC", BIRTH_DATE, "QXRAW1", "QXQUERY")
FORGED = "FORGEDLINE"


def forms(value: str) -> set[str]:
    """The ways a value can be printed: raw, escaped, repr, JSON, utf-8 bytes repr, each PN component."""
    out = {value, escape(value), repr(value)[1:-1], json.dumps(value)[1:-1], repr(value.encode())[2:-1]}
    out |= {part for part in value.replace("\n", "^").replace("\r", "^").split("^") if len(part) >= 5}
    return out


SENTINEL_FORMS = set().union(*(forms(v) for v in (NAME, PATIENT_ID, ACCESSION))) | set(MARKERS)


@pytest.fixture(scope="module")
def scanned(orthanc_nodes, tmp_path_factory):
    """The stack with spans printed to each service's output (its log file)."""
    for n in orthanc_nodes:
        if not n.running:
            n.start()

    def configure(cfg):
        return msgspec.structs.replace(cfg, telemetry=msgspec.structs.replace(cfg.telemetry, traces="console"))

    s = make_stack(tmp_path_factory.mktemp("log-scan"), orthanc_nodes, configure=configure)
    yield s
    s.close()


def sentinel_studies(dest: Path) -> list[Path]:
    files = generate_studies(dest, studies=2, series_per_study=1, instances_per_series=3, seed=4242, rows=16, cols=16)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = NAME
        ds.PatientID = PATIENT_ID
        ds.AccessionNumber = ACCESSION
        ds.PatientBirthDate = BIRTH_DATE
        ds.save_as(path, enforce_file_format=True)
    return files


def malformed_dataset(dest: Path) -> tuple[pydicom.Dataset, bytes]:
    """A dataset whose PatientID is encoded as UL with 6 bytes (not a multiple of 4)."""
    from pynetdicom.dsutils import encode

    (path,) = generate_studies(dest, studies=1, series_per_study=1, instances_per_series=1, seed=4343, rows=16, cols=16)
    ds = pydicom.dcmread(path)
    ds.PatientID = "PLACEHOLD1"
    raw = encode(ds, False, True)
    assert raw is not None
    element = b"\x10\x00\x20\x00LO\x0a\x00PLACEHOLD1"
    assert raw.count(element) == 1
    return ds, raw.replace(element, b"\x10\x00\x20\x00UL\x06\x00" + BAD_PATIENT_ID)


def answered(stack: Stack) -> float:
    """C-STOREs ingest has answered, whatever the status."""
    return stack.metric("ingest", "switchyard_ingest_receive_to_ack_seconds_count") or 0.0


def send_raw_store(stack: Stack, ds: pydicom.Dataset, raw: bytes) -> None:
    before = answered(stack)
    ae = AE(ae_title="SCANSCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", stack.cfg.ingest.port, ae_title=stack.cfg.ingest.ae_title)
    assert assoc.is_established
    try:
        cx = assoc.accepted_contexts[0]
        assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
        assert cx.context_id is not None and assoc.acceptor.maximum_length is not None
        sock = assoc.dul.socket.socket
        for pdu in store_pdus(ds, ds.SOPInstanceUID, cx.context_id, min(assoc.acceptor.maximum_length, 16384), raw=raw):
            sock.sendall(pdu)
        wait_for(lambda: answered(stack) > before, timeout=20, what="the malformed store answered")
    finally:
        assoc.abort()


def raw_exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send ``data``, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return got


def http_get(stack: Stack, path: str) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.cfg.catalog.http_port}{path}",
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as rsp:
            return rsp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def qr_find(stack: Stack, keys: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """DCMTK findscu at STUDY level (study root) against the probe's Q/R front door."""
    p = stack.cfg.probe
    args = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID="]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}"]
    argv = [str(ls.DCMTK_BIN / "findscu"), "-aet", "TESTSCU", "-aec", p.qr_ae_title, *args, "127.0.0.1", str(p.qr_port)]
    return subprocess.run(argv, env=ls.dicom_env(), capture_output=True, text=True, errors="replace", timeout=60)


def metrics_pages(stack: Stack) -> dict[str, str]:
    return {
        s: urllib.request.urlopen(f"http://127.0.0.1:{ls.metrics_port(stack.cfg, s)}/metrics", timeout=5)
        .read()
        .decode(errors="replace")
        for s in ls.SERVICES
    }


def data_logs(stack: Stack) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in (stack.data_dir / "logs").glob("*.log")}


def test_no_sentinel_in_logs_metrics_or_spans(scanned: Stack, tmp_path):
    files = sentinel_studies(tmp_path / "sentinel")
    sent = scanned.send(files, calling_ae="SCANSCU")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in files}

    def delivered() -> bool:
        rows = scanned.catalog("/api/studies?limit=1000")
        studies = {pydicom.dcmread(p).StudyInstanceUID for p in files}
        done = [r for r in rows if r["study_instance_uid"] in studies]
        return len(done) == len(studies) and sum(r["delivered"] for r in done) >= len(uids)

    wait_for(delivered, timeout=120, what="sentinel studies delivered")

    # Bad input: a malformed PatientID, non-DICOM bytes, a calling AE forging a log line.
    ds, raw = malformed_dataset(tmp_path / "malformed")
    send_raw_store(scanned, ds, raw)
    raw_exchange(scanned.cfg.ingest.port, b"GET /?patient_id=QXQUERY HTTP/1.1\r\n\r\n" + bytes(range(256)) * 8)
    raw_exchange(
        scanned.cfg.ingest.port,
        associate_rq(b"EV\n" + FORGED.encode(), scanned.cfg.ingest.ae_title.encode(), CTImageStorage),
    )
    # HTTP: patient fields in the query string, well-formed and malformed requests.
    assert http_get(scanned, "/api/studies?patient_id=QXQUERY1&accession=QXQUERY2") in (200, 400, 403, 404)
    raw_exchange(
        scanned.cfg.catalog.http_port,
        b"GET /api/studies?patient_id=QXQUERY3 HTTP/1.1\r\nHost: x\r\nBad\x01Header: QXQUERY4\r\n\r\n",
    )
    raw_exchange(scanned.cfg.catalog.http_port, b"GET /api/studies?patient_id=QXQUERY5\x00 HTTP/9.9\r\n\r\n")

    # Q/R: patient values as query keys (matching, and a malformed date range), from an AE the
    # fixtures let in (the door is closed to others); answered or refused, the keys must not be logged.
    matched = qr_find(scanned, {"PatientName": "Qxzentinel*", "PatientID": "QXPID*", "AccessionNumber": ""})
    assert matched.returncode == 0, matched.stdout + matched.stderr
    qr_find(scanned, {"PatientBirthDate": "QXQUERY6\n-1877", "PatientID": "QXQUERY7\x1b"})

    # Every association above has ended (and been logged) before the logs are read.
    wait_for(
        lambda: scanned.metric("ingest", "switchyard_ingest_open_associations") == 0,
        timeout=30,
        what="open associations back to 0",
    )
    pages = metrics_pages(scanned)
    # Stopping the services flushes their span processors: every span is in the logs after this.
    for service in ls.SERVICES:
        scanned.stop(service)
    logs = data_logs(scanned)
    assert any('"trace_id"' in text for text in logs.values()), "no span was exported: the scan would be blind"
    found = [
        (where, form)
        for where, text in {**logs, **{f"/metrics {k}": v for k, v in pages.items()}}.items()
        for form in SENTINEL_FORMS
        if form in text
    ]
    assert not found, found

    # Log injection: the AE's newline did not start a line of its own.
    for name, text in logs.items():
        assert not any(line.startswith(FORGED) for line in text.splitlines()), name


def test_data_dir_is_owner_only(scanned: Stack, orthanc_nodes):
    """After the demo above: secrets, stores, blobs, spools, logs and NATS' files are 0600/0700."""
    roots = [scanned.data_dir, *(n.data_dir / "orthanc" / n.node.id for n in orthanc_nodes)]
    exposed = []
    checked = 0
    for root in roots:
        for path in [root, *root.rglob("*")]:
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue  # a temporary file gone meanwhile
            checked += 1
            if stat.S_ISLNK(mode):
                continue
            if mode & 0o077:
                exposed.append(f"{oct(stat.S_IMODE(mode))} {path}")
    assert checked > 20
    assert not exposed, "\n".join(exposed[:40])
    assert stat.S_IMODE(scanned.config_path.stat().st_mode) == 0o600
