"""Writing files so that they survive a power cut: the primitives every stage that owns files uses."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
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


def _atomically(
    dest: Path, fill: Callable[[BinaryIO], object], *, tmp_dir: Path | None = None, mode: int | None = None
) -> Path:
    """dest appears whole or not at all (temp file, fsync, rename, fsync of the folder).

    tmp_dir: where the temp file lives (same filesystem as dest; default dest's folder), for owners
    that clean their own leftovers after a crash. mode: the temp file's mode, set before a byte is
    written, so the data is never readable by more than the final file will be."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)
    return dest


def write_atomically(
    dest: Path, data: bytes, *, tmp_dir: Path | None = None, mode: int | None = None
) -> Path:
    """dest appears whole or not at all, and survives a power cut once this returns."""
    return _atomically(dest, lambda fh: fh.write(data), tmp_dir=tmp_dir, mode=mode)


def copy_atomically(
    src: Path | BinaryIO, dest: Path, *, tmp_dir: Path | None = None, chunk: int = 1 << 20
) -> Path:
    """write_atomically from a file (a path, or one the caller opened, e.g. with O_NOFOLLOW), a chunk at
    a time: a 500 MB instance never sits in memory."""
    if not isinstance(src, Path):
        return _atomically(dest, lambda fout: shutil.copyfileobj(src, fout, chunk), tmp_dir=tmp_dir)
    with open(src, "rb") as fin:
        return _atomically(dest, lambda fout: shutil.copyfileobj(fin, fout, chunk), tmp_dir=tmp_dir)


def link_or_copy(src: Path, dest: Path) -> bool:
    """dest names src's content durably: a hard link (no copy, atomic), or on another filesystem a
    durable copy. False when dest already exists (the same item again after a crash)."""
    try:
        os.link(src, dest)
        fsync_dir(dest.parent)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        copy_atomically(src, dest)
    return True
