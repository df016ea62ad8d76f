"""Hashes of files, a chunk at a time (a 500 MB DICOM never sits in memory): sha256 for model and engine
identity, image de-duplication, ids for files outside the spool; any hash object via `digest_stream`."""

from __future__ import annotations

import hashlib
import io
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

CHUNK = 2 << 20
# Hashes one chunk while the caller reads the next: both release the GIL, so a file is hashed in about
# the time of the slower of the two (a 15 MB cart image, BLAKE3, on a 2-core test machine: 3.3-5.2 ms
# instead of 5.2-5.6, as its memory bandwidth allowed at the time).
# Every image is hashed on its way in, before it is accepted. One thread: callers that hash at once
# share it.
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")


class Digest(Protocol):
    """What hashlib's and blake3's hash objects both offer."""

    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def digest_stream(handle: io.RawIOBase | io.BufferedIOBase, digest: Digest) -> str:
    """Hex digest of what is left to read in `handle` (the caller opens and positions it)."""
    buffers = (bytearray(CHUNK), bytearray(CHUNK))
    hashing: Future[object] | None = None
    for turn in itertools.count():
        buffer = buffers[turn % 2]  # the other one may still be being hashed
        count = handle.readinto(buffer)
        if hashing is not None:
            hashing.result()
        if not count:
            break
        hashing = _HASHER.submit(digest.update, memoryview(buffer)[:count])
    return digest.hexdigest()


def sha256_stream(handle: io.RawIOBase | io.BufferedIOBase) -> str:
    return digest_stream(handle, hashlib.sha256())


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_stream(handle)
