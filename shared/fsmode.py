"""Owner-only files and directories: stores, spools, blobs, configs and credentials hold patient data or secrets.

Two layers: every Switchyard process starts with ``PRIVATE_UMASK`` (files 0600,
directories 0700, inherited by the servers the stack starts), and the places
that create secrets or data directories set the mode explicitly as well, so a
caller with a looser umask (a test harness, a library) cannot widen them.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_umask() -> int:
    """Set the process umask to owner-only; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` and any missing parents as 0700 directories.

    Existing directories are left as they are (``path`` may sit under /tmp or a
    shared mount): tighten a data directory you own with ``os.chmod``.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # made by another process meanwhile
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode is masked by the umask; never widened here
    return path


def write_private(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` as a 0600 file (an existing file's mode is tightened first)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)
    return path


def open_private_append(path: str | os.PathLike[str]) -> int:
    """An O_APPEND descriptor on a 0600 file (logs the stack writes for its children)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return fd
