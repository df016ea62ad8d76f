"""Hashing a file through a memory map, only where that cannot kill the process.

The de-duplication hash (appliance/ingest/identity.py) reads every accepted DICOM whole before the image
may go on: read() copies 15 MB of a cart image out of the page cache first. A memory map hands the hash
the page cache itself: on the 2026-12-01 machine the hash of a 15 MB cart image took 1.2 instead of
3.1 ms alone, and the daemon's end to end went from ~30 to ~28 ms.

But a mapped file that shrinks under the map, or a page that cannot be read from disk, raises SIGBUS,
which ends the process; read() would only come back short or fail. So a file is mapped only when:

- nobody has it open for writing, and nobody can open it for writing or truncate it while it is hashed:
  a read lease (fcntl F_SETLEASE). The kernel refuses the lease while a writer has the file open, and
  holds back a later open for writing or truncate until the lease is let go (a few milliseconds here).
  Only the file's owner (or CAP_LEASE) can take one, and not every filesystem offers them (NFS, FUSE);
- every page of it is in memory already (mincore): a file just written or just read is; one that is
  not could meet a bad sector on the way in;
- it lies on the spool's own filesystem (the caller names the device): a page dropped from memory
  between the check and the hash is then read back from the appliance's own disk, never from a USB stick
  that was pulled or a network share.

Anything else is read the plain way (`None`). The lease-break signal is SIGURG, whose default action is
to ignore it: the kernel's default, SIGIO, would end the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import signal
from collections.abc import Iterator

import numpy as np

from appliance.hashing import Digest

log = logging.getLogger(__name__)

# Below this, a plain read costs about what mapping costs.
MIN_MAPPED_BYTES = 1 << 20
# Hashed 8 MB at a time, each piece's pages let go of after it: a mapped page counts in the daemon's
# resident memory while it is mapped (a whole 15 MB image took its peak from 280 to 297 MB in a backlog).
# A 15 MB image: 1.53 ms whole, 1.64 in 8 MB pieces, 1.76 in 4 MB pieces.
PIECE_BYTES = 8 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


@contextlib.contextmanager
def _read_lease(fd: int) -> Iterator[bool]:
    """True while this process holds a read lease on `fd` (see the module's docstring)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: open for writing somewhere; EACCES: not our file; EINVAL: no leases here
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def digest_mapped(fd: int, start: int, digest: Digest, device: int) -> str | None:
    """The hex digest of the file open read-only on `fd` from `start`, hashed through a memory map; None
    when mapping it is not safe or not worth it here (the caller reads it instead, with a new digest:
    this one may have been fed part of the file). `device`: st_dev of the spool's filesystem."""
    try:
        return _digest_mapped(fd, start, digest, device)
    except Exception:  # never a reason to key the image differently: the plain read decides
        log.debug("mapping fd %d failed; reading instead", fd, exc_info=True)
        return None


def _digest_mapped(fd: int, start: int, digest: Digest, device: int) -> str | None:
    st = os.fstat(fd)
    if st.st_dev != device or st.st_size - start < MIN_MAPPED_BYTES:
        return None
    with _read_lease(fd) as leased:
        if not leased:
            return None
        size = os.fstat(fd).st_size  # final now: no writer can change it while the lease is held
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            resident = (ctypes.c_ubyte * pages)()
            # Bit 0 of each byte says the page is in memory (the other bits are undefined).
            if (
                _libc.mincore(address, size, resident) != 0
                or not (np.frombuffer(bytes(resident), np.uint8) & 1).all()
            ):
                return None
            mapped = (ctypes.c_ubyte * size).from_address(address)
            with memoryview(mapped) as raw, raw.cast("B") as view:  # ctypes says "<B"; hashes want "B"
                # Pieces on multiples of PIECE_BYTES (a multiple of the page size): a piece's pages are
                # let go of after it without touching the next one's.
                for edge in range(start - start % PIECE_BYTES, size, PIECE_BYTES):
                    end = min(edge + PIECE_BYTES, size)
                    digest.update(view[max(edge, start) : end])
                    # The page cache keeps the pages; only this process's mapping of them goes.
                    _libc.madvise(address + edge, end - edge, mmap.MADV_DONTNEED)
        finally:
            _libc.munmap(address, size)
    return digest.hexdigest()
