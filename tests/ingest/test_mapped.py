"""Hashing through a memory map (appliance/ingest/mapped.py): the same digest as reading, and only where
no writer and no missing page can end the process with SIGBUS: real files, a real second process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import blake3
import numpy as np
import pytest

import appliance.ingest.mapped as mapped_module
from appliance.ingest.identity import BLAKE3_CHUNK, _hash_from, dataset_blake3, open_nofollow
from appliance.ingest.mapped import MIN_MAPPED_BYTES, _read_lease, digest_mapped


def _blob(tmp_path: Path, size: int = 3 * MIN_MAPPED_BYTES + 4097) -> tuple[Path, bytes]:
    content = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "image.dcm"
    path.write_bytes(content)
    return path, content


def _device(path: Path) -> int:
    return path.stat().st_dev


@pytest.mark.parametrize("start", [0, 132, 4096, 4097])
@pytest.mark.parametrize("piece", [mapped_module.PIECE_BYTES, MIN_MAPPED_BYTES + 4096])
def test_the_mapped_digest_is_the_digest_of_the_bytes_from_start(
    tmp_path: Path, start: int, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mapped_module, "PIECE_BYTES", piece)  # and pieces of 257 pages
    path, content = _blob(tmp_path)
    with open_nofollow(path) as fh:
        mapped = digest_mapped(fh.fileno(), start, blake3.blake3(), _device(tmp_path))
    assert mapped == blake3.blake3(content[start:]).hexdigest()
    # The spool's hash says the same whichever way it went.
    read = _hash_from(path, start, blake3.blake3(), BLAKE3_CHUNK)
    assert dataset_blake3(path, start, _device(tmp_path)) == dataset_blake3(path, start) == read == mapped


def test_a_file_open_for_writing_is_read_not_mapped(tmp_path: Path) -> None:
    path, content = _blob(tmp_path)
    writer = os.open(path, os.O_WRONLY)  # a writer could truncate it under the map
    try:
        with open_nofollow(path) as fh:
            assert digest_mapped(fh.fileno(), 0, blake3.blake3(), _device(tmp_path)) is None
        assert dataset_blake3(path, 0, _device(tmp_path)) == blake3.blake3(content).hexdigest()
    finally:
        os.close(writer)


def test_a_small_file_is_read_not_mapped(tmp_path: Path) -> None:
    path, _ = _blob(tmp_path, MIN_MAPPED_BYTES - 1)
    with open_nofollow(path) as fh:
        assert digest_mapped(fh.fileno(), 0, blake3.blake3(), _device(tmp_path)) is None


def test_a_file_not_in_memory_is_read_not_mapped(tmp_path: Path) -> None:
    path, content = _blob(tmp_path)
    with open_nofollow(path) as fh:
        os.fsync(fh.fileno())  # clean pages can be dropped from the page cache
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        got = digest_mapped(fh.fileno(), 0, blake3.blake3(), _device(tmp_path))
    if got is not None:
        pytest.skip("the kernel kept the file's pages in memory after POSIX_FADV_DONTNEED")
    assert dataset_blake3(path, 0, _device(tmp_path)) == blake3.blake3(content).hexdigest()


def test_a_truncate_waits_for_the_lease_and_does_not_end_this_process(tmp_path: Path) -> None:
    """While the lease is held another process's truncate waits; the lease-break signal is ignored."""
    path, content = _blob(tmp_path)
    with open_nofollow(path) as fh, _read_lease(fh.fileno()) as leased:
        assert leased
        truncate = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(path)!r}, 10)"])
        time.sleep(0.5)
        assert truncate.poll() is None and path.stat().st_size == len(content)
    assert truncate.wait(timeout=30) == 0 and path.stat().st_size == 10


def test_a_file_on_another_filesystem_than_the_spool_is_read_not_mapped(tmp_path: Path) -> None:
    """A USB stick or a network share: a page dropped between the check and the hash would be read back
    from a device that may be gone."""
    path, content = _blob(tmp_path)
    with open_nofollow(path) as fh:
        assert digest_mapped(fh.fileno(), 0, blake3.blake3(), _device(tmp_path) + 1) is None
    assert dataset_blake3(path, 0, _device(tmp_path) + 1) == blake3.blake3(content).hexdigest()


def test_a_failure_on_the_mapped_path_is_never_raised(tmp_path: Path) -> None:
    """The caller reads instead: an error here must not change how the image is keyed."""
    path, _ = _blob(tmp_path)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)  # a descriptor that is no longer open: fstat fails inside
    assert digest_mapped(fd, 0, blake3.blake3(), _device(tmp_path)) is None
