"""DICOM over TLS: a CA, server and client certificates generated here; mutual TLS required."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from pathlib import Path

import msgspec
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from shared.corpus import generate_studies
from shared.dimse import NODELAY_HANDLER
from tests.fixtures.servers import Stack, make_stack

pytestmark = pytest.mark.integration


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool = False, server: bool = False):
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                        critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    crt, pem = path.with_suffix(".crt"), path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Switchyard test CA", ca_key, "Switchyard test CA", ca_key, ca=True)
    ca_crt, _ = _write(d / "ca", ca, ca_key)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_crt, srv_pem = _write(d / "server", _cert("ingest", srv_key, "Switchyard test CA", ca_key, server=True), srv_key)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli_crt, cli_pem = _write(d / "client", _cert("modality", cli_key, "Switchyard test CA", ca_key), cli_key)
    # A client certificate from a CA the server does not trust.
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _cert("Rogue CA", rogue_key, "Rogue CA", rogue_key, ca=True)
    _write(d / "rogue-ca", rogue_ca, rogue_key)
    rogue_cli_key = ec.generate_private_key(ec.SECP256R1())
    rogue_crt, rogue_pem = _write(d / "rogue-client", _cert("rogue", rogue_cli_key, "Rogue CA", rogue_key), rogue_cli_key)
    return {"ca": ca_crt, "server_crt": srv_crt, "server_key": srv_pem, "client_crt": cli_crt,
            "client_key": cli_pem, "rogue_crt": rogue_crt, "rogue_key": rogue_pem}


@pytest.fixture(scope="module")
def tls_ingest(orthanc_nodes, pki, tmp_path_factory):
    def configure(cfg):
        return msgspec.structs.replace(cfg, ingest=msgspec.structs.replace(
            cfg.ingest, tls_cert_file=str(pki["server_crt"]), tls_key_file=str(pki["server_key"]),
            tls_ca_file=str(pki["ca"]), network_timeout_s=5.0))

    stack = make_stack(tmp_path_factory.mktemp("ingest-tls"), orthanc_nodes, ("ingest",), configure)
    yield stack
    stack.close()


def client_context(pki, cert: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki[f"{cert}_crt"]), str(pki[f"{cert}_key"]))
    return ctx


def store(stack: Stack, path: Path, ctx: ssl.SSLContext | None):
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    tls_args = (ctx, "127.0.0.1") if ctx else None
    assoc = ae.associate("127.0.0.1", stack.cfg.ingest.port, ae_title=stack.cfg.ingest.ae_title,
                         tls_args=tls_args, evt_handlers=[NODELAY_HANDLER])
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(pydicom.dcmread(path)).Status)
    finally:
        assoc.release()


def received_uids(stack: Stack) -> list[str]:
    return [e.sop_instance_uid for e in stack.received_events()]


def test_store_over_mutual_tls(tls_ingest, pki, tmp_path):
    path = generate_studies(tmp_path, studies=1, series_per_study=1, instances_per_series=1, seed=41, rows=16, cols=16)[0]
    assert store(tls_ingest, path, client_context(pki)) == 0
    assert received_uids(tls_ingest).count(pydicom.dcmread(path).SOPInstanceUID) == 1


@pytest.mark.parametrize("client", ["plain", "no-client-cert", "untrusted-client-cert"])
def test_peers_without_a_trusted_certificate_get_no_association(tls_ingest, pki, tmp_path, client):
    path = generate_studies(tmp_path, studies=1, series_per_study=1, instances_per_series=1, seed=42, rows=16, cols=16)[0]
    ctx = {"plain": None, "no-client-cert": client_context(pki, cert=None),
           "untrusted-client-cert": client_context(pki, cert="rogue")}[client]
    assert store(tls_ingest, path, ctx) is None
    assert pydicom.dcmread(path).SOPInstanceUID not in received_uids(tls_ingest)
    # The server keeps serving trusted peers.
    other = generate_studies(tmp_path / "ok", studies=1, series_per_study=1, instances_per_series=1, seed=43,
                             rows=16, cols=16)[0]
    assert store(tls_ingest, other, client_context(pki)) == 0


def test_silent_connection_does_not_block_tls_peers(tls_ingest, pki, tmp_path):
    """A peer that connects and never starts the handshake must not hold up the others."""
    path = generate_studies(tmp_path, studies=1, series_per_study=1, instances_per_series=1, seed=44, rows=16, cols=16)[0]
    with socket.create_connection(("127.0.0.1", tls_ingest.cfg.ingest.port)):
        # Before the fix the handshake of the silent peer blocked pynetdicom's accept loop
        # with no timeout: this association was never accepted (the sender's 5 s ACSE timeout).
        assert store(tls_ingest, path, client_context(pki)) == 0
    assert pydicom.dcmread(path).SOPInstanceUID in received_uids(tls_ingest)
