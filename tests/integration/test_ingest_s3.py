"""Ingest on the S3 blob store: the object store going away is answered, not absorbed.

A moto server of its own (stopped and started by the test, on a fixed port),
so the session's S3 server stays up for the other tests.
"""

from __future__ import annotations

import msgspec
import pydicom
import pytest

from shared.blobs.s3 import S3BlobStore
from switchyard.corpus import generate_studies
from tests.fixtures.s3 import moto_endpoint, s3_blob_config, start_moto
from tests.fixtures.servers import make_stack
from tests.fixtures.util import free_port

pytestmark = pytest.mark.integration


async def test_s3_store_unavailable_answers_out_of_resources_and_keeps_nothing(orthanc_nodes, tmp_path):
    port, log = free_port(), tmp_path / "moto.log"
    moto = start_moto(port, log)
    blobs = s3_blob_config(moto_endpoint(port, log), "ingest-s3")

    def configure(cfg):
        return msgspec.structs.replace(cfg, blobs=blobs)

    stack = make_stack(tmp_path / "stack", orthanc_nodes, ("ingest",), configure)
    try:
        first, second = generate_studies(
            tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=4242
        )
        ok = stack.send([first], extra=["-v"])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        [event] = await stack.received_events()
        assert S3BlobStore(blobs).exists(event.blob_key)

        moto.stop(10)
        refused = stack.send([second], extra=["-v"])
        out = refused.stdout + refused.stderr
        assert "Received Store Response (Refused: OutOfResources)" in out, out
        assert "blob store refused" in stack.log("ingest")
        uid = pydicom.dcmread(second).SOPInstanceUID
        assert uid not in {e.sop_instance_uid for e in await stack.received_events()}
        assert list((tmp_path / "stack" / "spool").glob("*")) == []

        # The store is back (empty: moto keeps nothing across restarts); the
        # sender retries, as a modality does, until the instance is accepted.
        moto = start_moto(port, log)
        for _ in range(3):
            again = stack.send([second], extra=["-v"])
            if again.returncode == 0 and "Refused" not in again.stdout + again.stderr:
                break
        assert again.returncode == 0, again.stdout + again.stderr
        events = [e for e in await stack.received_events() if e.sop_instance_uid == uid]
        assert len(events) == 1
        assert S3BlobStore(blobs).exists(events[0].blob_key)
    finally:
        stack.close()
        moto.stop(10)
