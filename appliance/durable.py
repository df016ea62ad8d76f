"""Writing files so that they survive a power cut: the primitives every stage that owns files uses."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in `path` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(dest: Path, data: bytes) -> Path:
    """dest appears whole or not at all, and survives a power cut once this returns."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dest.parent)
    return dest


def copy_atomically(src: Path, dest: Path, *, chunk: int = 1 << 20) -> Path:
    """write_atomically from a file, a chunk at a time: a 500 MB instance never sits in memory."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dest.parent)
    return dest
