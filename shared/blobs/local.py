"""Local-directory blob store, the embedded default.

Writes go to a temporary file in the target directory, are fsynced, renamed
into place and the directory fsynced: a blob is either whole or absent, and
present after a crash once put_file returned.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from shared.blobs.base import CHUNK, BlobNotFound, BlobStore, BlobStoreError, check_key
from shared.fsmode import private_dir


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore(BlobStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        private_dir(self.root)  # blobs are patient data: 0700 dirs, 0600 files (mkstemp)

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    def put_file(self, key: str, src: Path) -> None:
        dest = self._path(key)
        try:
            private_dir(dest.parent)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise BlobStoreError(f"local blob write failed: {exc.strerror or exc}") from exc

    def sync_ahead(self, src: Path) -> bool:
        try:
            _fsync_file(src)
        except OSError as exc:
            raise BlobStoreError(f"local blob write failed: {exc.strerror or exc}") from exc
        return True

    def adopt_file(self, key: str, src: Path, synced: bool = False) -> None:
        # fsync the file (unless sync_ahead did), rename it into place, fsync the
        # directory: one write of the bytes instead of two. Another filesystem:
        # copy like put_file. The rename comes after the file's fsync, so a key
        # that exists always holds whole bytes (ingest trusts an existing key).
        dest = self._path(key)
        try:
            private_dir(dest.parent)
            if not synced:
                _fsync_file(src)
            os.replace(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise BlobStoreError(f"local blob write failed: {exc.strerror or exc}") from exc
            super().adopt_file(key, src)
            return
        try:
            _fsync_dir(dest.parent)
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise BlobStoreError(f"local blob write failed: {exc.strerror or exc}") from exc

    def get_file(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc
        except OSError as exc:
            raise BlobStoreError(f"local blob read failed: {exc.strerror or exc}") from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.exists() else None

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise BlobStoreError(f"blob directory {self.root} is not writable")
