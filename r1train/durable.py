"""fsync through read-only handles, where the OS allows it: checkpoints, their manifests, the metrics files."""

from __future__ import annotations

import os


def posix_fsync(target: str | int):
    """fsync a file or directory: `target` is a path (opened read-only here, then closed) or the descriptor of a
    file open for reading. A directory's fsync puts its entries (names created, renamed or removed) on disk.
    A no-op outside POSIX: Windows opens no directory (NTFS journals its entries), and its fsync
    (FlushFileBuffers) needs a handle open for writing."""
    if os.name != "posix":
        return
    if isinstance(target, int):
        os.fsync(target)
        return
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
