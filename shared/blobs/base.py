"""The BlobStore contract shared by the local and the S3 store."""

from __future__ import annotations

import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
_KEY = re.compile(r"^[a-z0-9]+/[0-9a-f]{2}/[0-9a-f]{64}$")


class BlobStoreError(RuntimeError):
    """The store could not do what was asked (unreachable, disk full, ...)."""


class BlobNotFound(BlobStoreError):
    pass


def content_key(sha256_hex: str) -> str:
    """Content-addressed key: the same bytes always land under the same key."""
    key = f"sha256/{sha256_hex[:2]}/{sha256_hex}"
    check_key(key)
    return key


def check_key(key: str) -> None:
    if not _KEY.match(key):
        raise ValueError(f"not a blob key: {key!r}")


class BlobStore(ABC):
    @abstractmethod
    def put_file(self, key: str, src: Path) -> None:
        """Store the file's bytes under key; durable when this returns."""

    def adopt_file(self, key: str, src: Path, synced: bool = False) -> None:
        """Store a file the caller hands over (it is gone afterwards); durable when this returns.

        Stores that can take the file as it is (same filesystem) avoid writing
        its bytes a second time; the rest copy and delete it. ``synced``: the
        caller already ran ``sync_ahead(src)`` and it returned True.
        """
        self.put_file(key, src)
        Path(src).unlink(missing_ok=True)

    def sync_ahead(self, src: Path) -> bool:
        """Make a file about to be adopted durable in its place, ahead of ``adopt_file``; True if done.

        Lets the caller overlap the flush of the bytes with its own checks (ingest
        parses the header meanwhile). Only a store that adopts files in place
        gains from it; the others return False and do nothing.
        """
        return False

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Write the blob's bytes to dest (created or replaced)."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the blob; the caller closes it."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None when there is no such blob."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; removing a missing blob is not an error."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def local_path(self, key: str) -> Path | None:
        """A filesystem path holding the blob, where the store has one."""
        return None

    def to_scratch_file(self, key: str, scratch: Path) -> Path:
        """The blob copied to a new file in ``scratch`` (the caller deletes it); blocking.

        For senders that need a file and a store that has none (S3); nothing is
        left behind when the copy fails.
        """
        scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch, suffix=".dcm")
        os.close(fd)
        dest = Path(name)
        try:
            self.get_file(key, dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest

    @abstractmethod
    def check(self) -> None:
        """Raise BlobStoreError when the store cannot currently take writes."""
