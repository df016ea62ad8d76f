"""The read of a new image started while the intake hashes it, when the cart has nothing else to do.

An image is accepted only once its de-duplication key is known, and that key hashes the whole dataset
(a 15 MB cart image: ~3 ms), after which the loop claims and reads it (~7 ms). On an idle cart the two
need not wait for each other: the intake opens the file and hands it here before hashing, the read-ahead
thread decodes it from that open file while the hash runs, and the loop, claiming the image a moment
later, takes the decoded image instead of reading the file again. On a busy cart nothing starts here:
the feeder's read-ahead already keeps both cores working, and a second decoded image would only add
memory.

Only uncompressed DICOM is read early. Until the image is accepted no spool row can count a crash
against it, so a file that crashed a compressed-data decoder (libjpeg, OpenJPEG, zlib) here would crash
the daemon at every restart without ever being refused; uncompressed pixel data is read by numpy alone.
Everything else about the read is the loop's own (`Analyzer.read`): its result is taken only if it
produced a decoded image from the very file claimed (same device, inode, size and modification time,
before and after the read), with the model the loop runs now; anything else is dropped and the loop
reads the file as it always does, with the file's own name in any refusal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from appliance.pipeline import PREFETCH, Analyzer, Job

log = logging.getLogger(__name__)

_NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
_FD_DIR = Path("/proc/self/fd")  # a path that opens the file already open, wherever it moved
_LONG_LENGTH_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR")
STALE_SECONDS = 30.0  # a read nobody claimed in this time is dropped


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Pending:
    identity: tuple[int, int, int, int]
    analyzer: Analyzer
    job: Job
    future: Future[bool]
    started: float


class EarlyRead:
    def __init__(self, analyzer: Callable[[], Analyzer]) -> None:
        """`analyzer`: the one the loop runs now (a reload replaces it)."""
        self._analyzer = analyzer
        self._lock = threading.Lock()
        self._pending: _Pending | None = None
        self.idle = False  # set by the feeder: True while the loop found nothing to claim

    def begin(self, path: Path) -> None:
        """The intake is about to hash `path` (a complete DICOM that passed its checks)."""
        if not self.idle or not _FD_DIR.is_dir():
            return
        with self._lock:
            if self._pending is not None and time.monotonic() - self._pending.started < STALE_SECONDS:
                return  # one at a time
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return  # the intake names the reason
            analyzer = self._analyzer()
            job = Job(path=_FD_DIR / str(fd), image_id="", source="early read")
            identity = _identity(os.fstat(fd))
            future = PREFETCH.submit(_read, analyzer, job, fd, identity)
            self._pending = _Pending(identity, analyzer, job, future, time.monotonic())

    def drop(self) -> None:
        """The intake did not accept the file: its early read is of no use."""
        with self._lock:
            self._pending = None

    def adopt(self, jobs: list[Job]) -> None:
        """Give the claimed job whose file was read early that read (waiting for it to finish)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending.analyzer is not self._analyzer():
            return
        for job in jobs:
            try:
                same = _identity(os.stat(job.path)) == pending.identity
            except OSError:
                continue
            if same and pending.future.result():
                job.image, job.tensor, job.geometry = (
                    pending.job.image,
                    pending.job.tensor,
                    pending.job.geometry,
                )
                job.timer = pending.job.timer
                return


def _read(analyzer: Analyzer, job: Job, fd: int, identity: tuple[int, int, int, int]) -> bool:
    """True when `job` holds a decoded, preprocessed image of the unchanged file."""
    try:
        with open(fd, "rb", closefd=False) as fh:
            head = fh.read(4096)
        if transfer_syntax(head) not in _NATIVE:
            return False
        analyzer.read(job)
        return job.reading is None and job.tensor is not None and _identity(os.fstat(fd)) == identity
    except Exception:  # the loop reads the file again and names whatever went wrong
        log.debug("early read of %s given up", job.path, exc_info=True)
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def transfer_syntax(head: bytes) -> str | None:
    """The Transfer Syntax UID named in the File Meta at the start of a Part 10 file (explicit VR little
    endian, as the standard has it); None when `head` holds no such File Meta."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 2:
            return None
        if head[pos + 4 : pos + 6] in _LONG_LENGTH_VRS:
            if pos + 12 > len(head):
                return None
            length, value_at = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, value_at = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if value_at + length > len(head):
            return None
        if element == 0x0010:
            return head[value_at : value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = value_at + length
    return None
