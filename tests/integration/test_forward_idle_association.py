"""A pooled association the node closed while idle is not the next instance's fault.

Orthanc ends an association idle longer than its DicomScpTimeout. The forwarder
keeps associations open between instances; the next C-STORE written into one the
node has closed meets a reset. Seen in a cluster test (2026-11-30): after a quiet
minute every node's associations had timed out, and one good instance was failed
on all three nodes as "node aborted the C-STORE" and dead-lettered for good.
"""

from __future__ import annotations

import pydicom
import pytest

from services.forwarder.sender import NodeSender
from switchyard.corpus import generate_studies
from tests.fixtures.servers import new_orthanc_node
from tests.fixtures.util import poll

pytestmark = pytest.mark.integration


async def test_an_association_the_node_timed_out_is_renewed_not_blamed(tmp_path):
    node = new_orthanc_node(1, tmp_path / "orthanc", overrides={"DicomScpTimeout": 1})
    node.start()
    try:
        files = generate_studies(tmp_path / "corpus", studies=1, series_per_study=1, instances_per_series=2, seed=7)
        sender = NodeSender(node.node, "SWITCHYARD", 10.0)
        metas = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        first, second = metas
        ts = str(first.file_meta.TransferSyntaxUID)
        assert (await sender.send(files[0], first.SOPClassUID, first.SOPInstanceUID, ts)).ok

        # Orthanc aborts the idle association after 1 s (an A-ABORT; the socket stays open).
        async def aborted() -> bool:
            return sender.assoc is not None and not sender.assoc.usable

        await poll(aborted, timeout=15, interval=0.1, what="the node's abort")
        outcome = await sender.send(files[1], second.SOPClassUID, second.SOPInstanceUID, ts)
        assert outcome.ok, outcome
        assert not outcome.instance
        await sender.close()
        assert node.client.sop_instance_uids() == {str(m.SOPInstanceUID) for m in metas}
    finally:
        node.stop()
