"""Ingest's per-peer association limit: one peer holding associations does not starve another.

A real ingest; the hog is pynetdicom (to read the A-ASSOCIATE-RJ fields), the
good sender DCMTK storescu.
"""

from __future__ import annotations

import msgspec
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage

from switchyard.corpus import generate_studies
from tests.fixtures.servers import Stack, make_stack

pytestmark = pytest.mark.integration

PER_PEER = 2
GLOBAL = 6


@pytest.fixture(scope="module")
def ingest(orthanc_nodes, tmp_path_factory):
    def configure(cfg):
        return msgspec.structs.replace(
            cfg,
            ingest=msgspec.structs.replace(
                cfg.ingest, max_associations=GLOBAL, max_associations_per_peer=PER_PEER, network_timeout_s=10.0
            ),
        )

    stack = make_stack(tmp_path_factory.mktemp("ingest-access"), orthanc_nodes, ("ingest",), configure)
    yield stack
    stack.close()


def hold(stack: Stack, aet: str) -> Association:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", stack.cfg.ingest.port, ae_title=stack.cfg.ingest.ae_title)


def test_default_per_peer_limit_is_below_the_global_one():
    from shared.config import IngestConfig

    cfg = IngestConfig()
    assert 0 < cfg.max_associations_per_peer < cfg.max_associations


async def test_one_peer_holding_associations_does_not_lock_out_another(ingest, tmp_path):
    held: list[Association] = []
    try:
        for _ in range(GLOBAL):  # as many as the whole worker has
            assoc = hold(ingest, "HOGSCU")
            if assoc.is_established:
                held.append(assoc)
            else:
                assert assoc.is_rejected
                rj = assoc.acceptor.primitive
                assert rj is not None
                # rejected-transient, service-provider (presentation), local-limit-exceeded: retry later
                assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert len(held) == PER_PEER
        assert ingest.metric("ingest", "switchyard_ingest_open_associations") == PER_PEER
        # Another peer still stores.
        path = generate_studies(
            tmp_path / "c", studies=1, series_per_study=1, instances_per_series=1, seed=7301, rows=16, cols=16
        )[0]
        result = ingest.send([path], calling_ae="GOODSCU", extra=["-v"])
        assert result.returncode == 0, result.stdout + result.stderr
        uid = pydicom.dcmread(path).SOPInstanceUID
        assert uid in {e.sop_instance_uid for e in await ingest.received_events()}
        # Logged with AE and address only.
        log = ingest.log("ingest")
        assert f"'HOGSCU' from 127.0.0.1 already holds {PER_PEER} associations (per-peer limit)" in log
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(header.PatientID) not in log
    finally:
        for assoc in held:
            assoc.release()


def test_a_released_association_frees_the_peers_slot(ingest):
    held = [hold(ingest, "CYCLESCU") for _ in range(PER_PEER)]
    try:
        assert all(a.is_established for a in held)
        held.append(extra := hold(ingest, "CYCLESCU"))
        assert extra.is_rejected
        held[0].release()
        held.append(again := hold(ingest, "CYCLESCU"))
        assert again.is_established
    finally:
        for a in held:
            if a.is_established:
                a.release()


def test_another_ae_from_the_same_address_has_its_own_share(ingest):
    """The key is AE + address: another AE from the same address has its own share."""
    mine = [hold(ingest, "SHAREA") for _ in range(PER_PEER)]
    other = [hold(ingest, "SHAREB") for _ in range(PER_PEER)]
    try:
        assert all(a.is_established for a in mine + other)
    finally:
        for a in mine + other:
            a.release()
