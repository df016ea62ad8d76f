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
  not could meet a bad sector on the way in.

Anything else is read the plain way (`None`). The lease-break signal is SIGURG, whose default action is
to ignore it: the kernel's default, SIGIO, would end the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import signal
from collections.abc import Iterator

from appliance.hashing import Digest

# Below this, a plain read costs about what mapping costs.
MIN_MAPPED_BYTES = 1 << 20

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


def digest_mapped(fd: int, start: int, digest: Digest) -> str | None:
    """The hex digest of the file open read-only on `fd` from `start`, hashed through a memory map; None
    when mapping it is not safe or not worth it here (the caller reads it instead)."""
    size = os.fstat(fd).st_size
    if size - start < MIN_MAPPED_BYTES:
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
            if _libc.mincore(address, size, resident) != 0 or 0 in bytes(resident):
                return None
            mapped = (ctypes.c_ubyte * size).from_address(address)
            with memoryview(mapped) as raw, raw.cast("B") as view:  # ctypes says "<B"; hashes want "B"
                digest.update(view[start:])
        finally:
            _libc.munmap(address, size)
    return digest.hexdigest()
