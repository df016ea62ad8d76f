"""The spool's folders: where an image's file lies, how it gets there, the reasons beside refused files.

Files move by atomic renames inside the spool's filesystem; files from elsewhere are first copied to
tmp/ and fsynced. The rows (appliance/ingest/spool.py) say where a file belongs; these helpers only move
it, so none of them touches the database.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from appliance.clock import now_iso
from appliance.durable import copy_atomically, fsync_dir, write_atomically
from appliance.errors import UserError
from appliance.ingest.identity import open_nofollow
from appliance.ingest.spool_records import COPY_CHUNK, QUARANTINE_COPY_MAX_BYTES, STATES, SpoolFull
from appliance.logs import printable
from appliance.retention import purge_older

log = logging.getLogger("appliance.ingest.spool")


class SpoolFolders:
    def __init__(self, root: Path, min_free_mb: float = 0.0) -> None:
        self.root = Path(root)
        self.min_free_mb = min_free_mb
        for sub in (*STATES, "tmp"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only or mistyped spool: the engineer's to fix, said plainly
                what = "is not a folder" if exc.errno == errno.EEXIST else exc.strerror or exc
                raise UserError(f"spool {self.root / sub}: cannot create: {what}") from exc

    def dir(self, state: str) -> Path:
        return self.root / state

    # -- space ---------------------------------------------------------------------------------
    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / 1e6

    def check_space(self, needed_bytes: int) -> None:
        free = self.free_mb()
        if free - needed_bytes / 1e6 < self.min_free_mb:
            raise SpoolFull(
                f"spool {self.root}: {free:.0f} MB free, {needed_bytes / 1e6:.1f} MB needed, "
                f"reserve {self.min_free_mb:.0f} MB; not accepting"
            )

    @contextlib.contextmanager
    def disk_full_is_spool_full(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SpoolFull(f"spool {self.root}: disk full {doing} (ENOSPC)") from exc
            raise

    # -- placing and moving ----------------------------------------------------------------------
    def place(self, src: Path, dest: Path, *, move: bool) -> bool:
        """Put src at dest atomically, not synced (see appliance/ingest/spool_accept.py for who syncs
        and when). Returns True when src is gone (it was renamed)."""
        if move:
            try:
                os.rename(src, dest)
                return True
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        with self.disk_full_is_spool_full(f"copying {src.name}"), open_nofollow(src) as fin:
            copy_atomically(fin, dest, tmp_dir=self.dir("tmp"), chunk=COPY_CHUNK)
        return False

    def sync_live(self) -> None:
        """fsync incoming/ and processing/: the renames into them and between them reach the disk (who
        calls it and when: appliance/ingest/spool_accept.py)."""
        for state in ("incoming", "processing"):
            fsync_dir(self.dir(state))

    def copy_to_tmp(self, path: Path) -> Path:
        """A durable copy under tmp/ (deleted by recovery if a crash leaves it there)."""
        staged = self.dir("tmp") / f"{uuid.uuid4().hex}.staged"
        with self.disk_full_is_spool_full(f"copying {path.name}"), open_nofollow(path) as fin:
            copy_atomically(fin, staged, tmp_dir=self.dir("tmp"), chunk=COPY_CHUNK)
        return staged

    def move(self, name: str, to_state: str) -> bool:
        """Move `name` from whichever live state holds it to `to_state`; False if it is not there.

        done/ too: the DICOM outputs of a done image can still fail it (appliance/processor.py). No
        fsync of the folder: the row already says where the file belongs, and recovery moves it there."""
        for state in ("processing", "incoming", "done"):
            if state == to_state:
                continue
            try:
                os.rename(self.dir(state) / name, self.dir(to_state) / name)
                return True
            except FileNotFoundError:
                continue
        return False

    def file_done(self, name: str) -> None:
        if self.move(name, "done"):
            # rename keeps the source's mtime; purge_done counts from the end of processing
            with contextlib.suppress(OSError):
                os.utime(self.dir("done") / name)

    def file_refused(self, name: str, refusal: str, original: str, source: str) -> None:
        """`refusal`: "reason\\ndetail", as the row keeps it."""
        reason, _, detail = refusal.partition("\n")
        self.move(name, "quarantine")
        self.write_reason(self.dir("quarantine") / name, reason, detail, original, source)

    # -- refused before an id ----------------------------------------------------------------------
    def refuse(self, path: Path, reason: str, detail: str, source: str, *, move: bool = True) -> Path:
        """A file refused before it got an id (empty, not an image, unreadable, symlink loop...).

        It is moved (or copied, when `move` is False or it is on another filesystem) into quarantine/
        under a time-stamped name; when it cannot be moved or read, only the reason file is written."""
        path = Path(path)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.dir("quarantine") / f"{stamp}-{path.name}"
        try:
            if path.is_symlink() or not move:
                if move:
                    os.rename(path, dest)  # the link itself, never its target
                elif path.is_file() and path.stat().st_size <= QUARANTINE_COPY_MAX_BYTES:
                    self.place(path, dest, move=False)
                elif path.is_file():  # a huge file on read-only media: its reason, not a copy
                    detail = f"{detail} (not copied: {path.stat().st_size / 2**20:.0f} MB; left at source)"
            else:
                self.place(path, dest, move=True)
        except SpoolFull:
            raise
        except OSError as exc:
            detail = f"{detail} (file left at source: {exc.strerror or exc})"
        self.write_reason(dest, reason, detail, str(path), source)
        log.warning("quarantined %s from %s: %s %s", path, source, reason, detail)
        return dest

    def write_reason(self, dest: Path, reason: str, detail: str, original: str, source: str) -> None:
        # One field a line: a newline in a file name must not forge one ("reason: ok"), and the
        # undecodable bytes of a name must not make the UTF-8 write fail.
        reason, detail, source, original = map(printable, (reason, detail, source, original))
        text = (
            f"reason: {reason}\ndetail: {detail}\nsource: {source}\noriginal: {original}\ntime: {now_iso()}\n"
        )
        write_atomically(dest.with_name(dest.name + ".reason.txt"), text.encode(), tmp_dir=self.dir("tmp"))

    # -- housekeeping ------------------------------------------------------------------------------
    def clear_tmp(self) -> None:
        for leftover in self.dir("tmp").iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def purge_quarantine(self, older_than_s: float) -> int:
        """Delete refused files and their reason files older than `older_than_s`."""
        return len(purge_older(self.dir("quarantine"), older_than_s))

    def purge_done(self, older_than_s: float, keep: Callable[[Path], bool] = lambda path: False) -> int:
        """Delete processed files older than `older_than_s` (`keep`: asked first, may spare one)."""
        return len(purge_older(self.dir("done"), older_than_s, keep=keep))
