"""Blob stores: where ingest keeps every received byte before anything else happens.

One synchronous, thread-safe interface: callers on an event loop run it on a
thread pool (ingest's io pool, ``asyncio.to_thread`` elsewhere), several at once. Stores move bytes
between files and the store in chunks, never a whole object in memory.
"""

from __future__ import annotations

from shared.blobs.base import BlobNotFound, BlobStore, BlobStoreError, content_key
from shared.config import BlobConfig


def open_blob_store(cfg: BlobConfig) -> BlobStore:
    match cfg.backend:
        case "local":
            from shared.blobs.local import LocalBlobStore

            return LocalBlobStore(cfg.path)
        case "s3":
            from shared.blobs.s3 import S3BlobStore

            return S3BlobStore(cfg)
    raise ValueError(f"unknown blob backend {cfg.backend!r}")


__all__ = ["BlobNotFound", "BlobStore", "BlobStoreError", "content_key", "open_blob_store"]
