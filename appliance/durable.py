"""Writing files so that they survive a power cut: the primitives every stage that owns files uses."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in `path` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomically(dest: Path, fill: Callable[[BinaryIO], object]) -> Path:
    """dest appears whole or not at all (temp file, fsync, rename, fsync of the folder)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dest.parent)
    return dest


def write_atomically(dest: Path, data: bytes) -> Path:
    """dest appears whole or not at all, and survives a power cut once this returns."""
    return _atomically(dest, lambda fh: fh.write(data))


def copy_atomically(src: Path, dest: Path, *, chunk: int = 1 << 20) -> Path:
    """write_atomically from a file, a chunk at a time: a 500 MB instance never sits in memory."""
    with open(src, "rb") as fin:
        return _atomically(dest, lambda fout: shutil.copyfileobj(fin, fout, chunk))
