"""digest_stream reads chunk by chunk into one buffer: the digest must be that of the bytes from the
handle's position to the end, whatever the size and the kind of handle."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import blake3
import numpy as np
import pytest

from appliance.hashing import CHUNK, digest_stream, sha256_file


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("buffered", [False, True])
def test_digest_of_the_rest_of_the_file(tmp_path: Path, size: int, buffered: bool) -> None:
    content = np.random.default_rng(size).integers(0, 256, size + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(content)
    with open(path, "rb", buffering=-1 if buffered else 0) as handle:
        assert isinstance(handle, io.BufferedReader if buffered else io.FileIO)
        handle.seek(7)
        assert digest_stream(handle, blake3.blake3()) == blake3.blake3(content[7:]).hexdigest()
    assert sha256_file(path) == hashlib.sha256(content).hexdigest()


def test_concurrent_callers_get_their_own_digests(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    blobs = []
    for index in range(4):
        blob = tmp_path / f"{index}"
        blob.write_bytes(bytes([index]) * (2 * CHUNK + index))
        blobs.append(blob)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(sha256_file, blobs))
    assert got == [hashlib.sha256(b.read_bytes()).hexdigest() for b in blobs]
