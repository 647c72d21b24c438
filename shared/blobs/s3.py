"""S3 blob store (MinIO, AWS S3 or anything speaking the S3 API), via the minio SDK.

Same contract as the local store: bytes move between files and the store in
chunks, a downloaded file is whole or absent, and every failure of the SDK or
the HTTP layer surfaces as ``BlobStoreError`` (a missing key as
``BlobNotFound``) so callers never need to know minio or urllib3 exceptions.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name
from urllib3.exceptions import HTTPError, MaxRetryError

from shared.blobs.base import CHUNK, BlobNotFound, BlobStore, BlobStoreError, check_key
from shared.config import BlobConfig

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# minio's own default is a 5-minute timeout with 5 retries: an unreachable
# endpoint would hang an ingest io thread (and its C-STORE) for half an hour. Fail in seconds.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0
RETRIES = 2

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject"})
_BUCKET_OURS = frozenset({"BucketAlreadyOwnedByYou"})

# Exceptions that mean "the store failed", whatever layer raised them.
_FAILURES = (MinioException, HTTPError, OSError)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    """A one-line cause without object reprs, URLs with queries, or credentials."""
    if isinstance(exc, S3Error):
        return f"{exc.code}: {_short(exc.message or '')}".rstrip(": ")
    if isinstance(exc, MaxRetryError):
        inner = exc.reason
        if inner is None:
            return "too many retries"
        cause = inner.__cause__ or inner.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return f"{type(inner).__name__}: {cause.strerror}"
        if isinstance(inner, urllib3.exceptions.ResponseError):
            return _short(str(inner))
        return type(inner).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    if isinstance(exc, MinioException):
        return _short(str(exc))
    return type(exc).__name__


class _S3Stream(io.RawIOBase):
    """Reads the object body straight off the HTTP response, chunk by chunk.

    Closing hands the connection back to minio's pool; a body not read to the
    end is closed first so the next request never sees its leftover bytes.
    """

    def __init__(self, response: urllib3.BaseHTTPResponse, what: str) -> None:
        super().__init__()
        self._response = response
        self._what = what
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed blob stream")
        try:
            if size is None or size < 0:
                data = self._response.read()
                self._eof = True
            else:
                data = self._response.read(size)
                if size and not data:
                    self._eof = True
        except _FAILURES as exc:
            raise BlobStoreError(f"{self._what} failed: {_reason(exc)}") from exc
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._eof:
                self._response.close()
            self._response.release_conn()
        finally:
            super().close()


class S3BlobStore(BlobStore):
    """Blobs as objects in one bucket; thread-safe (minio's client and pool are)."""

    def __init__(self, cfg: BlobConfig) -> None:
        self.endpoint = cfg.s3_endpoint
        self.bucket = cfg.s3_bucket
        try:
            check_bucket_name(self.bucket)
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
                retries=urllib3.Retry(total=RETRIES, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
                # Ingest stores from its io pool, up to max_associations threads at once.
                maxsize=32,
                cert_reqs="CERT_REQUIRED",
                ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            )
            self._client = Minio(
                cfg.s3_endpoint,
                access_key=cfg.s3_access_key,
                secret_key=cfg.s3_secret_key,
                secure=cfg.s3_secure,
                region=cfg.s3_region or None,
                http_client=http,
            )
        except ValueError as exc:
            # No str(exc) of the whole config: keep the keys out of messages.
            raise BlobStoreError(
                f"invalid s3 configuration ({self.endpoint}, bucket {self.bucket!r}): {_short(str(exc))}"
            ) from exc
        self._bucket_lock = threading.Lock()
        self._bucket_ready = False

    def __repr__(self) -> str:
        return f"S3BlobStore({self.endpoint}/{self.bucket})"

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate minio/urllib3/OS failures into the store's own exceptions."""
        try:
            yield
        except S3Error as exc:
            if key is not None and exc.code in _NOT_FOUND:
                raise BlobNotFound(key) from exc
            if exc.code == "NoSuchBucket":
                # Deleted under us: fail this call, create it again on the next.
                self._bucket_ready = False
            raise BlobStoreError(self._message(op, key, exc)) from exc
        except _FAILURES as exc:
            raise BlobStoreError(self._message(op, key, exc)) from exc

    def _message(self, op: str, key: str | None, exc: BaseException) -> str:
        where = f"{self.endpoint}/{self.bucket}" + (f"/{key}" if key else "")
        return f"s3 {op} {where} failed: {_reason(exc)}"

    def _ensure_bucket(self) -> None:
        """Create the bucket on first use, once, however many threads race for it."""
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            with self._errors("create bucket"):
                if not self._client.bucket_exists(self.bucket):
                    try:
                        self._client.make_bucket(self.bucket)
                    except S3Error as exc:
                        # Another process (or replica) created it first.
                        if exc.code not in _BUCKET_OURS:
                            raise
            self._bucket_ready = True

    def put_file(self, key: str, src: Path) -> None:
        # fput_object streams the file: one PUT when small, a multipart upload
        # of bounded parts when large. One part at a time, so memory stays at
        # one part per call however many threads are uploading.
        check_key(key)
        self._ensure_bucket()
        with self._errors("put", key):
            self._client.fput_object(self.bucket, key, os.fspath(src), num_parallel_uploads=1)

    def get_file(self, key: str, dest: Path) -> None:
        # Own chunked copy instead of fget_object: fget_object leaves its
        # ".part.minio" file behind on failure; here the temp file is removed
        # and dest appears only by an atomic rename once complete.
        check_key(key)
        dest = Path(dest)
        self._ensure_bucket()
        with self._errors("get", key):
            response = self._client.get_object(self.bucket, key)
        tmp: str | None = None
        try:
            with self._errors("get", key):
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.stream(CHUNK):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
                tmp = None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            response.close()
            response.release_conn()

    def open(self, key: str) -> BinaryIO:
        check_key(key)
        self._ensure_bucket()
        with self._errors("get", key):
            response = self._client.get_object(self.bucket, key)
        return _S3Stream(response, f"s3 read {self.endpoint}/{self.bucket}/{key}")  # type: ignore[return-value]

    def size(self, key: str) -> int | None:
        check_key(key)
        self._ensure_bucket()
        try:
            with self._errors("stat", key):
                return self._client.stat_object(self.bucket, key).size
        except BlobNotFound:
            return None

    def delete(self, key: str) -> None:
        check_key(key)
        self._ensure_bucket()
        try:
            with self._errors("delete", key):
                self._client.remove_object(self.bucket, key)
        except BlobNotFound:
            pass  # S3 deletes are idempotent anyway; some servers still say 404.

    def check(self) -> None:
        """Ask the server every time (not the cached flag): is the bucket there?"""
        with self._errors("check bucket"):
            exists = self._client.bucket_exists(self.bucket)
        if not exists:
            with self._bucket_lock:
                self._bucket_ready = False
            self._ensure_bucket()
