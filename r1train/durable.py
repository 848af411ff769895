"""fsync through read-only handles, where the OS allows it: checkpoints, their manifests, the metrics files; and a
file replaced whole (write_replace)."""

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


def write_replace(path: str, text: str):
    """path's content becomes text: written beside it, on disk (fsync), renamed over it, the rename on disk too. A
    failed or killed write leaves the previous file whole, and no reader sees a partial one."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it replaces the old file
        os.replace(tmp, path)
        posix_fsync(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
