"""Hashes of files, a chunk at a time (a 500 MB DICOM never sits in memory): sha256 for model and engine
identity, image de-duplication, ids for files outside the spool; any hash object via `digest_stream`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1 << 20


class Digest(Protocol):
    """What hashlib's and blake3's hash objects both offer."""

    def update(self, data: bytes, /) -> object: ...

    def hexdigest(self) -> str: ...


def digest_stream(handle: BinaryIO, digest: Digest) -> str:
    """Hex digest of what is left to read in `handle` (the caller opens and positions it)."""
    for block in iter(lambda: handle.read(CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_stream(handle: BinaryIO) -> str:
    return digest_stream(handle, hashlib.sha256())


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_stream(handle)
