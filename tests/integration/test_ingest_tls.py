"""DICOM over TLS: a CA, server and client certificates (tests/fixtures/pki.py); mutual TLS required."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import msgspec
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from shared.dimse import NODELAY_HANDLER
from switchyard.corpus import generate_studies
from tests.fixtures.pki import client_context
from tests.fixtures.servers import Stack, make_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_ingest(orthanc_nodes, pki, tmp_path_factory):
    def configure(cfg):
        return msgspec.structs.replace(
            cfg,
            ingest=msgspec.structs.replace(
                cfg.ingest,
                tls_cert_file=str(pki["server_crt"]),
                tls_key_file=str(pki["server_key"]),
                tls_ca_file=str(pki["ca"]),
                network_timeout_s=5.0,
            ),
        )

    stack = make_stack(tmp_path_factory.mktemp("ingest-tls"), orthanc_nodes, ("ingest",), configure)
    yield stack
    stack.close()


def store(stack: Stack, path: Path, ctx: ssl.SSLContext | None):
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
    tls_args = (ctx, "127.0.0.1") if ctx else None
    assoc = ae.associate(
        "127.0.0.1",
        stack.cfg.ingest.port,
        ae_title=stack.cfg.ingest.ae_title,
        tls_args=tls_args,
        evt_handlers=[NODELAY_HANDLER],
    )
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(pydicom.dcmread(path)).Status)
    finally:
        assoc.release()


async def received_uids(stack: Stack) -> list[str]:
    return [e.sop_instance_uid for e in await stack.received_events()]


async def test_store_over_mutual_tls(tls_ingest, pki, tmp_path):
    path = generate_studies(tmp_path, studies=1, series_per_study=1, instances_per_series=1, seed=41, rows=16, cols=16)[
        0
    ]
    assert store(tls_ingest, path, client_context(pki)) == 0
    assert (await received_uids(tls_ingest)).count(pydicom.dcmread(path).SOPInstanceUID) == 1


@pytest.mark.parametrize("client", ["plain", "no-client-cert", "untrusted-client-cert"])
async def test_peers_without_a_trusted_certificate_get_no_association(tls_ingest, pki, tmp_path, client):
    path = generate_studies(tmp_path, studies=1, series_per_study=1, instances_per_series=1, seed=42, rows=16, cols=16)[
        0
    ]
    ctx = {
        "plain": None,
        "no-client-cert": client_context(pki, cert=None),
        "untrusted-client-cert": client_context(pki, cert="rogue"),
    }[client]
    assert store(tls_ingest, path, ctx) is None
    assert pydicom.dcmread(path).SOPInstanceUID not in await received_uids(tls_ingest)
    # The server keeps serving trusted peers.
    other = generate_studies(
        tmp_path / "ok", studies=1, series_per_study=1, instances_per_series=1, seed=43, rows=16, cols=16
    )[0]
    assert store(tls_ingest, other, client_context(pki)) == 0


async def test_silent_connection_does_not_block_tls_peers(tls_ingest, pki, tmp_path):
    """A peer that connects and never starts the handshake must not hold up the others."""
    path = generate_studies(tmp_path, studies=1, series_per_study=1, instances_per_series=1, seed=44, rows=16, cols=16)[
        0
    ]
    with socket.create_connection(("127.0.0.1", tls_ingest.cfg.ingest.port)):
        # Before the fix the handshake of the silent peer blocked pynetdicom's accept loop
        # with no timeout: this association was never accepted (the sender's 5 s ACSE timeout).
        assert store(tls_ingest, path, client_context(pki)) == 0
    assert pydicom.dcmread(path).SOPInstanceUID in await received_uids(tls_ingest)
