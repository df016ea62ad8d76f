"""sha256 of files, a chunk at a time (a 500 MB DICOM never sits in memory): model and engine identity,
image de-duplication, ids for files outside the spool."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def sha256_stream(handle: BinaryIO) -> str:
    """Hex sha256 of what is left to read in `handle` (the caller opens and positions it)."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_stream(handle)
