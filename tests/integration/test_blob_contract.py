"""The BlobStore contract, run unchanged against the local store and the S3 store.

The S3 store talks to a real moto server process over HTTP (tests.fixtures.s3).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import urllib3

from shared.blobs import BlobNotFound, BlobStore, BlobStoreError, content_key, open_blob_store
from shared.blobs.base import CHUNK, check_key
from shared.blobs.local import LocalBlobStore
from shared.blobs.s3 import S3BlobStore
from shared.config import BlobConfig
from tests.fixtures.s3 import S3Server, s3_blob_config, s3_server  # noqa: F401
from tests.fixtures.util import free_port

pytestmark = pytest.mark.integration

# A bit over 5 MiB: more than one minio part (5 MiB minimum), so the S3 store
# goes through a real multipart upload.
BIG = 5 * 1024 * 1024 + 12345


def _bucket() -> str:
    return f"sy-{uuid.uuid4().hex[:20]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return open_blob_store(BlobConfig(backend="local", path=str(tmp_path / "blobs")))
    server: S3Server = request.getfixturevalue("s3_server")
    return open_blob_store(s3_blob_config(server, _bucket()))


def _write(path: Path, data: bytes) -> tuple[Path, str]:
    path.write_bytes(data)
    return path, content_key(hashlib.sha256(data).hexdigest())


def _random_key() -> str:
    return content_key(hashlib.sha256(os.urandom(16)).hexdigest())


def _leftovers(directory: Path, expected: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in expected)


def test_round_trip_of_a_big_file(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(BIG)
    src, key = _write(tmp_path / "src.bin", data)
    store.put_file(key, src)
    assert store.exists(key)
    assert store.size(key) == BIG
    out = tmp_path / "out"
    out.mkdir()
    store.get_file(key, out / "dest.bin")
    assert (out / "dest.bin").read_bytes() == data
    # No temp files left next to dest.
    assert _leftovers(out, {"dest.bin"}) == []


def test_get_file_replaces_an_existing_dest(store: BlobStore, tmp_path: Path) -> None:
    src, key = _write(tmp_path / "src.bin", b"new content")
    store.put_file(key, src)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"old content that is longer than the new one")
    store.get_file(key, dest)
    assert dest.read_bytes() == b"new content"


def test_open_streams_in_chunks(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(BIG)
    src, key = _write(tmp_path / "src.bin", data)
    store.put_file(key, src)
    chunks = []
    with store.open(key) as stream:
        while chunk := stream.read(64 * 1024):
            assert len(chunk) <= 64 * 1024
            chunks.append(chunk)
    assert len(chunks) > 1
    assert b"".join(chunks) == data


def test_open_closed_early_leaves_the_store_usable(store: BlobStore, tmp_path: Path) -> None:
    # Closing a half-read stream must not leave its leftover bytes on a pooled
    # connection for the next request to trip over.
    data = os.urandom(3 * CHUNK)
    src, key = _write(tmp_path / "src.bin", data)
    store.put_file(key, src)
    for _ in range(3):
        stream = store.open(key)
        assert stream.read(1000) == data[:1000]
        stream.close()
    assert store.size(key) == len(data)
    with store.open(key) as stream:
        assert stream.read() == data


def test_missing_key(store: BlobStore, tmp_path: Path) -> None:
    key = _random_key()
    assert store.exists(key) is False
    assert store.size(key) is None
    with pytest.raises(BlobNotFound):
        store.get_file(key, tmp_path / "dest.bin")
    with pytest.raises(BlobNotFound):
        store.open(key)


def test_failed_get_file_leaves_no_dest(store: BlobStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlobNotFound):
        store.get_file(_random_key(), out / "dest.bin")
    assert _leftovers(out, set()) == []


def test_delete_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    src, key = _write(tmp_path / "src.bin", b"to be deleted")
    store.put_file(key, src)
    assert store.exists(key)
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)
    store.delete(_random_key())
    assert store.size(key) is None


def test_put_same_key_twice_keeps_the_latest(store: BlobStore, tmp_path: Path) -> None:
    key = _random_key()
    first = tmp_path / "first.bin"
    first.write_bytes(b"first version, longer than the second")
    second = tmp_path / "second.bin"
    second.write_bytes(b"second")
    store.put_file(key, first)
    store.put_file(key, second)
    assert store.size(key) == len(b"second")
    with store.open(key) as stream:
        assert stream.read() == b"second"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256/ab",
        "../../etc/passwd",
        "sha256/AB/" + "a" * 64,
        "sha256/ab/" + "g" * 64,
        "sha256/ab/" + "a" * 63,
        "/sha256/ab/" + "a" * 64,
    ],
)
def test_invalid_key_is_rejected(store: BlobStore, tmp_path: Path, bad: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    for call in (
        lambda: store.put_file(bad, src),
        lambda: store.get_file(bad, tmp_path / "dest.bin"),
        lambda: store.open(bad),
        lambda: store.size(bad),
        lambda: store.delete(bad),
        lambda: store.exists(bad),
    ):
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "dest.bin").exists()


def test_content_key_is_valid() -> None:
    digest = hashlib.sha256(b"hello").hexdigest()
    key = content_key(digest)
    check_key(key)
    assert key == f"sha256/{digest[:2]}/{digest}"
    with pytest.raises(ValueError):
        content_key("not-a-digest")


def test_concurrent_puts_on_a_fresh_store(store: BlobStore, tmp_path: Path) -> None:
    # The S3 store creates its bucket lazily: many first calls at once.
    files = [_write(tmp_path / f"src{i}.bin", os.urandom(1000 + i)) for i in range(12)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(files))

    def put(src: Path, key: str) -> None:
        try:
            barrier.wait(timeout=10)
            store.put_file(key, src)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=f) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    for src, key in files:
        assert store.size(key) == src.stat().st_size


def test_check_passes_on_a_working_store(store: BlobStore) -> None:
    store.check()


def test_missing_source_file_is_a_store_error(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(BlobStoreError):
        store.put_file(_random_key(), tmp_path / "does-not-exist")


# --- S3 only ---------------------------------------------------------------------


def test_open_blob_store_picks_the_backend(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    s3 = open_blob_store(s3_blob_config(s3_server, _bucket()))
    assert isinstance(s3, S3BlobStore)
    local = open_blob_store(BlobConfig(backend="local", path=str(tmp_path)))
    assert isinstance(local, LocalBlobStore)


def test_s3_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    cfg = BlobConfig(
        backend="s3",
        s3_endpoint=f"127.0.0.1:{free_port()}",
        s3_bucket="switchyard",
        s3_access_key="AKIDSECRETACCESS",
        s3_secret_key="sUpErSeCrEt-KeY",
    )
    store = open_blob_store(cfg)
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    key = _random_key()
    started = time.monotonic()
    with pytest.raises(BlobStoreError) as info:
        store.put_file(key, src)
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"took {elapsed:.1f}s to give up"
    assert not isinstance(info.value, BlobNotFound)
    message = str(info.value)
    assert "sUpErSeCrEt-KeY" not in message and "AKIDSECRETACCESS" not in message
    assert len(message) < 300
    # Every other call fails the same way, and check() reports it.
    for call in (
        lambda: store.size(key),
        lambda: store.open(key),
        lambda: store.check(),
        lambda: store.get_file(key, tmp_path / "dest.bin"),
        lambda: store.delete(key),
    ):
        with pytest.raises(BlobStoreError):
            call()
    assert time.monotonic() - started < 60
    assert not (tmp_path / "dest.bin").exists()


def test_s3_endpoint_that_never_completes_a_connect_fails_fast(tmp_path: Path) -> None:
    # A listener whose accept queue is full: Linux drops further SYNs, so a
    # connect hangs like one to a firewalled host. Only the short connect
    # timeout (not minio's default 5 minutes x 5 retries) ends it quickly.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                probe = socket.socket()
                probe.settimeout(0.5)
                try:
                    probe.connect(("127.0.0.1", port))
                except TimeoutError:
                    probe.close()
                    break
                fillers.append(probe)
            else:
                pytest.skip("this kernel accepts connects beyond the backlog; no black hole")
            store = open_blob_store(BlobConfig(backend="s3", s3_endpoint=f"127.0.0.1:{port}"))
            src = tmp_path / "src.bin"
            src.write_bytes(b"payload")
            started = time.monotonic()
            with pytest.raises(BlobStoreError, match="ConnectTimeout"):
                store.put_file(_random_key(), src)
            elapsed = time.monotonic() - started
            assert elapsed < 15, f"took {elapsed:.1f}s to give up"
        finally:
            for f in fillers:
                f.close()


def test_s3_error_response_is_a_store_error(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    # An S3 error answer (here NoSuchBucket: the bucket was deleted under a
    # running store) surfaces as BlobStoreError, not minio's S3Error; the next
    # call creates the bucket again.
    store = S3BlobStore(s3_blob_config(s3_server, _bucket()))
    store.check()
    store._client.remove_bucket(store.bucket)
    src, key = _write(tmp_path / "src.bin", b"payload")
    with pytest.raises(BlobStoreError) as info:
        store.put_file(key, src)
    assert not isinstance(info.value, BlobNotFound)
    assert "NoSuchBucket" in str(info.value)
    store.put_file(key, src)
    assert store.size(key) == len(b"payload")


def test_s3_get_file_failing_mid_stream_leaves_no_partial_file(
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = S3BlobStore(s3_blob_config(s3_server, _bucket()))
    data = os.urandom(3 * CHUNK)
    src, key = _write(tmp_path / "src.bin", data)
    store.put_file(key, src)

    real_get_object = store._client.get_object

    def breaking_get_object(*args, **kwargs):
        response = real_get_object(*args, **kwargs)
        real_stream = response.stream

        def stream(amt=None, decode_content=None):
            it = real_stream(amt, decode_content)
            yield next(it)  # one good chunk lands in the temp file ...
            raise urllib3.exceptions.ProtocolError("connection broken mid-body")

        monkeypatch.setattr(response, "stream", stream)
        return response

    monkeypatch.setattr(store._client, "get_object", breaking_get_object)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlobStoreError) as info:
        store.get_file(key, out / "dest.bin")
    assert not isinstance(info.value, BlobNotFound)
    assert _leftovers(out, set()) == []
    monkeypatch.undo()
    store.get_file(key, out / "dest.bin")
    assert (out / "dest.bin").read_bytes() == data


def test_s3_check_recreates_a_deleted_bucket(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    store = S3BlobStore(s3_blob_config(s3_server, _bucket()))
    store.check()
    assert store._client.bucket_exists(store.bucket)
    store._client.remove_bucket(store.bucket)
    store.check()
    src, key = _write(tmp_path / "src.bin", b"after recreate")
    store.put_file(key, src)
    assert store.size(key) == len(b"after recreate")


def test_adopt_after_sync_ahead_holds_the_bytes(store: BlobStore, tmp_path: Path) -> None:
    """sync_ahead (the local store flushes in place, S3 has nothing to do) then adopt_file(synced=...)."""
    data = os.urandom(64 * 1024)
    src, key = _write(tmp_path / "spool.dcm", data)
    synced = store.sync_ahead(src)
    assert synced is isinstance(store, LocalBlobStore)
    store.adopt_file(key, src, synced=synced)
    assert not src.exists()  # handed over
    store.get_file(key, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    if synced:  # a spool file that vanished is a store error (ingest answers 0xA7xx)
        with pytest.raises(BlobStoreError):
            store.sync_ahead(tmp_path / "gone.dcm")
