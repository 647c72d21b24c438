"""Every readable file of pydicom's bundled test data, sent with DCMTK storescu in its own
transfer syntax (compressed ones too), is stored byte-identical and announced once.

storescu proposes compressed transfer syntaxes only through a config-file
profile (or one --propose-* option at a time), so the files are grouped by
transfer syntax and each group is sent with a profile written here that
proposes exactly that syntax for the group's SOP classes: nothing is converted.
A file storescu cannot send unchanged (DCMTK cannot parse it, or re-encodes it
on the way: judged by a bit-preserving storescp in the same run) goes with
pynetdicom, which sends a file's dataset bytes as they are
(STORE_SEND_CHUNKED_DATASET).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from shared.dicomfile import dataset_offset
from shared.dicomvalidate import DatasetError, validate
from shared.dimse import NODELAY_HANDLER, settle
from switchyard import stack as ls
from switchyard.corpus import bundled_test_files
from tests.fixtures.ingest import dcmtk_reads, storescu_exact
from tests.fixtures.util import free_port

pytestmark = pytest.mark.integration


def send_unchanged_with_pynetdicom(stack, paths: list[Path], headers: dict) -> list[int]:
    """C-STORE each file's dataset bytes as they are, in the file's own transfer syntax."""
    ae = AE(ae_title="CORPUS")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(headers[path][1], [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate(
        "127.0.0.1", stack.cfg.ingest.port, ae_title=stack.cfg.ingest.ae_title, evt_handlers=[NODELAY_HANDLER]
    )
    assert assoc.is_established
    try:
        statuses = []
        for path in paths:
            settle(assoc)
            statuses.append(int(assoc.send_c_store(path).Status))
        return statuses
    finally:
        assoc.release()


def after_meta(path: Path) -> bytes:
    data = path.read_bytes()
    with open(path, "rb") as f:
        return data[dataset_offset(f) :]


def structurally_valid(path: Path, transfer_syntax: str) -> bool:
    try:
        validate(after_meta(path), transfer_syntax)
        return True
    except DatasetError:
        return False


def sent_unchanged_by_storescu(
    paths: list[Path], uids: dict[Path, str], sop_classes: dict[Path, str], work: Path
) -> list[Path]:
    """The files storescu puts on the wire byte for byte, judged by a bit-preserving DCMTK storescp.

    storescu re-serialises what it sends: group lengths are recalculated
    (693_J2KR.dcm's wrong (7FE0,0000)), undefined-length sequences get explicit
    lengths (JPEG-LL.dcm), trailing bytes after the dataset are dropped
    (CT_small.dcm). Such a file is changed by the sender, not by ingest, so it
    goes with pynetdicom instead, which sends the file's dataset bytes as they are.
    """
    port = free_port()
    out_dir = work / "storescp-bit-preserving"
    proc = ls.start_storescp(port, out_dir, work / "storescp.log", "STORESCP", extra=["+B"])
    try:
        storescu_exact(port, "STORESCP", paths, sop_classes, work)
    finally:
        proc.stop()
    received = {f.name.split(".", 1)[1]: f for f in out_dir.iterdir() if "." in f.name}
    return [p for p in paths if uids[p] in received and after_meta(received[uids[p]]) == after_meta(p)]


async def test_every_readable_bundled_file_is_stored_byte_identical_and_announced_once(
    ingest_only, tmp_path, monkeypatch
):
    files = bundled_test_files(tmp_path / "corpus", any_transfer_syntax=True)
    headers = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers[path] = (str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    # Files no node would accept (today SC_rgb_jpeg.dcm: implicit VR data under an explicit VR
    # transfer syntax) are answered 0xC000 and not announced (issue #13).
    refused = [p for p in files if not structurally_valid(p, headers[p][2])]
    assert [p.name for p in refused] == ["SC_rgb_jpeg.dcm"], [p.name for p in refused]
    files = [p for p in files if p not in refused]
    uids = {p: h[0] for p, h in headers.items()}
    sop_classes = {p: h[1] for p, h in headers.items()}
    # Broader than the uncompressed subset: compressed syntaxes are in.
    assert len({h[2] for h in headers.values()}) >= 9, sorted({h[2] for h in headers.values()})

    readable_by_dcmtk = [p for p in files if dcmtk_reads(p, uids[p])]
    with_storescu = sent_unchanged_by_storescu(readable_by_dcmtk, uids, sop_classes, tmp_path)
    with_pynetdicom = [p for p in files if p not in set(with_storescu)]
    # Today (DCMTK 3.6.7, pydicom 3.0): storescu sends 98 of 137 files unchanged, in 5 transfer
    # syntaxes, JPEG baseline, JPEG lossless and JPEG 2000 lossless among them.
    storescu_syntaxes = {headers[p][2] for p in with_storescu}
    assert len(with_storescu) >= 90, len(with_storescu)
    assert {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90"} <= storescu_syntaxes

    failures = storescu_exact(
        ingest_only.cfg.ingest.port, ingest_only.cfg.ingest.ae_title, with_storescu, sop_classes, tmp_path
    )
    assert not failures, failures
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert send_unchanged_with_pynetdicom(ingest_only, with_pynetdicom, headers) == [0] * len(with_pynetdicom)
    assert send_unchanged_with_pynetdicom(ingest_only, refused, headers) == [0xC000] * len(refused)

    events = await ingest_only.received_events()
    counts = Counter(e.sop_instance_uid for e in events)
    by_uid = {e.sop_instance_uid: e for e in events}
    blobs = Path(ingest_only.cfg.blobs.path)
    for path in files:
        uid = uids[path]
        assert counts[uid] == 1, (path.name, counts[uid])
        event = by_uid[uid]
        sent = after_meta(path)
        assert after_meta(blobs / event.blob_key) == sent, path.name
        assert event.dataset_digest == hashlib.sha256(sent).hexdigest(), path.name
        assert event.transfer_syntax_uid == headers[path][2], path.name
    assert len(counts) == len(files)
    assert not {uids[p] for p in refused} & set(counts)
