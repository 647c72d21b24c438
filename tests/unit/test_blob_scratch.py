"""BlobStore.to_scratch_file: the one blob-to-file copy the forwarder and the probe's Q/R share."""

from __future__ import annotations

import hashlib

import pytest

from shared.blobs import BlobNotFound, content_key
from shared.blobs.local import LocalBlobStore


def test_copies_the_blob_into_a_new_file_in_scratch(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    src = tmp_path / "src.dcm"
    src.write_bytes(b"DICM" * 1000)
    key = content_key(hashlib.sha256(src.read_bytes()).hexdigest())
    store.put_file(key, src)
    scratch = tmp_path / "scratch"  # created on first use
    first = store.to_scratch_file(key, scratch)
    second = store.to_scratch_file(key, scratch)
    assert first.parent == scratch and second.parent == scratch and first != second
    assert first.read_bytes() == src.read_bytes() == second.read_bytes()


def test_a_failed_copy_leaves_no_file(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    scratch = tmp_path / "scratch"
    with pytest.raises(BlobNotFound):
        store.to_scratch_file(content_key("0" * 64), scratch)
    assert list(scratch.iterdir()) == []
