"""A durable spool: incoming/ -> processing/ -> done/ | quarantine/, one stable image id per file.

Every state change is one atomic rename inside the spool's filesystem; files from elsewhere are first
copied to tmp/ and fsynced. The directory a file sits in is the truth about its state; a SQLite
table (WAL) remembers every key ever accepted (SOPInstanceUID + content hash, or content hash) for
de-duplication and the order of arrival. `recover()` (call it at start) puts whatever a killed process
left in processing/ back into incoming/ and re-registers files whose database row was never committed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from appliance.clock import now_iso
from appliance.durable import copy_atomically, fsync_dir, write_atomically
from appliance.errors import ApplianceError, InputRejected
from appliance.ingest import reasons, sniff
from appliance.ingest.identity import (
    content_sha256,
    dedup_key,
    image_id_for,
    open_nofollow,
    plain_file_refusal,
)
from appliance.logs import printable
from appliance.pseudonym import load_or_create_salt
from appliance.retention import purge_older

log = logging.getLogger(__name__)

STATES = ("incoming", "processing", "done", "quarantine")
_EXT = {"dicom": "dcm", "png": "png", "jpeg": "jpg"}
_COPY_CHUNK = 1 << 20
# An image sent again while its row is in one of these states was never analysed: it gets another go.
_RETRY_STATES = ("quarantine", "lost")


# A refused file on read-only media is copied into quarantine only up to this size (a 2 GB file
# copied on every restart would fill the spool disk it is meant to protect).
QUARANTINE_COPY_MAX_BYTES = 64 * 2**20


class SpoolFull(ApplianceError):
    """The spool's disk is full (or below the configured reserve): stop accepting, keep the sources."""

    errno = errno.ENOSPC


@dataclass(frozen=True)
class Accepted:
    image_id: str
    path: Path  # where the file now lies in incoming/
    key: str


@dataclass(frozen=True)
class Duplicate:
    image_id: str
    key: str
    first_source: str
    source_removed: bool


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str
    quarantined: Path | None


@dataclass(frozen=True)
class SpoolItem:
    image_id: str
    path: Path  # in processing/
    source: str
    original: str
    accepted_at: str
    key: str


class Spool:
    def __init__(self, root: Path, *, min_free_mb: float = 0.0, id_secret: bytes | None = None) -> None:
        """`id_secret`: the key of the image ids (PatientKeys.image_id_secret(), from the site salt). A
        spool opened without one (tools, tests) keys them with a secret file of its own, never unkeyed."""
        self.root = Path(root)
        self.min_free_mb = min_free_mb
        self._lock = threading.RLock()
        for sub in (*STATES, "meta", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._id_secret = id_secret or load_or_create_salt(self.root / "image-id.key", what="spool id key")
        self._db = sqlite3.connect(self.root / "spool.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # a scrubbed original path is overwritten, not freed
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS items (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE NOT NULL,"
            " image_id TEXT UNIQUE NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL, source TEXT,"
            " original TEXT, accepted_at TEXT)"
        )
        # How often processing this image failed: found in processing/ after the process died (a
        # decoder segfault) or an exception in any stage. One that keeps failing must be quarantined,
        # not retried forever in a restart loop. `last_failure` says why, for the quarantine reason.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        if "crashes" not in columns:
            self._db.execute("ALTER TABLE items ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
        if "last_failure" not in columns:
            self._db.execute("ALTER TABLE items ADD COLUMN last_failure TEXT")

    # -- helpers -------------------------------------------------------------------------------
    def _dir(self, state: str) -> Path:
        return self.root / state

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise SpoolFull(f"spool {self.root}: disk full writing the database (ENOSPC: {exc})") from exc
            raise

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / 1e6

    def _check_space(self, needed_bytes: int) -> None:
        free = self.free_mb()
        if free - needed_bytes / 1e6 < self.min_free_mb:
            raise SpoolFull(
                f"spool {self.root}: {free:.0f} MB free, {needed_bytes / 1e6:.1f} MB needed, "
                f"reserve {self.min_free_mb:.0f} MB; not accepting"
            )

    def _place(self, src: Path, dest: Path, *, move: bool) -> bool:
        """Put src at dest atomically. Returns True when src is gone (it was renamed)."""
        if move:
            try:
                os.rename(src, dest)
                fsync_dir(dest.parent)
                return True
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
        with self._disk_full_is_spool_full(f"copying {src.name}"), open_nofollow(src) as fin:
            copy_atomically(fin, dest, tmp_dir=self._dir("tmp"), chunk=_COPY_CHUNK)
        return False

    @contextlib.contextmanager
    def _disk_full_is_spool_full(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise SpoolFull(f"spool {self.root}: disk full {doing} (ENOSPC)") from exc
            raise

    def _write_json(self, dest: Path, data: dict[str, str]) -> None:
        with self._disk_full_is_spool_full(f"writing {dest.name}"):
            write_atomically(dest, json.dumps(data, indent=1).encode(), tmp_dir=self._dir("tmp"))

    # -- accepting -----------------------------------------------------------------------------
    def accept(self, path: Path, source: str, *, move: bool = True) -> Accepted | Duplicate | Rejected:
        """Take one complete file from a watched folder. `move=False` copies (read-only media).

        Files whose content is not an image at all are quarantined here (Rejected); the rest get an id."""
        path = Path(path)
        try:
            refusal = plain_file_refusal(path)
            if refusal is not None:
                raise refusal
            kind = sniff(path)
            size = path.stat().st_size
        except InputRejected as exc:
            where = self.quarantine_file(path, exc.reason, exc.detail, source, move=move)
            return Rejected(exc.reason, exc.detail, where)
        self._check_space(size)
        try:
            key = dedup_key(path, kind)
        except PermissionError as exc:
            detail = f"{path.name}: {exc.strerror}"
            return Rejected(
                reasons.PERMISSION_DENIED,
                detail,
                self.quarantine_file(path, reasons.PERMISSION_DENIED, detail, source, move=move),
            )
        image_id = image_id_for(key, self._id_secret)
        with self._lock:
            row = self._db.execute(
                "SELECT source, state, image_id FROM items WHERE key = ?", (key,)
            ).fetchone()
            retried = None
            if row is not None and row[1] in _RETRY_STATES:
                # Sent again after it was quarantined (or vanished): analysed again, under a new id (the
                # journal keeps the first result per id). The old row keeps its file in quarantine/.
                retried, image_id = row[2], image_id_for(f"{key}#{row[2]}", self._id_secret)
                row = None
            if row is not None:
                removed = False
                if move:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed = True
                log.info(
                    "duplicate %s from %s (%s) first seen from %s; %s",
                    path,
                    source,
                    key,
                    row[0],
                    "removed" if removed else "left in place",
                )
                return Duplicate(row[2], key, row[0], removed)
            name = f"{image_id}.{_EXT[kind]}"
            accepted_at = now_iso()
            self._write_json(
                self._dir("meta") / f"{image_id}.json",
                {
                    "image_id": image_id,
                    "key": key,
                    "name": name,
                    "original": str(path),
                    "source": source,
                    "accepted_at": accepted_at,
                },
            )
            dest = self._dir("incoming") / name
            try:
                renamed = self._place(path, dest, move=move)
                try:
                    with self._tx() as db:
                        if retried is not None:  # the key is unique: the old row's is kept, made its own
                            db.execute(
                                "UPDATE items SET key = key || '#' || image_id WHERE image_id = ?", (retried,)
                            )
                        db.execute(
                            "INSERT INTO items (key, image_id, name, state, source, original, accepted_at)"
                            " VALUES (?, ?, ?, 'incoming', ?, ?, ?)",
                            (key, image_id, name, source, str(path), accepted_at),
                        )
                except SpoolFull:
                    # Undo, so the source is offered again once there is room (nothing half-accepted).
                    if renamed:
                        os.rename(dest, path)
                    else:
                        dest.unlink()
                    raise
            except SpoolFull:
                with contextlib.suppress(OSError):
                    (self._dir("meta") / f"{image_id}.json").unlink()
                raise
            if move and not renamed:
                # Copied from another filesystem: the spool copy is durable, now the original may go.
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        log.info("accepted %s from %s as %s", path, source, image_id)
        return Accepted(image_id, dest, key)

    # -- the pipeline side ---------------------------------------------------------------------
    def claim(self, n: int = 1) -> list[SpoolItem]:
        """Up to `n` of the oldest waiting files (a batch for the backend), each moved to processing/."""
        items: list[SpoolItem] = []
        with self._lock:
            while len(items) < n:
                item = self.claim_next()
                if item is None:
                    break
                items.append(item)
        return items

    def claim_next(self) -> SpoolItem | None:
        """Oldest file in incoming/ -> processing/; None when nothing waits."""
        with self._lock:
            while True:
                row = self._db.execute(
                    "SELECT image_id, name, source, original, accepted_at, key FROM items"
                    " WHERE state = 'incoming' ORDER BY seq LIMIT 1"
                ).fetchone()
                if row is None:
                    return None
                image_id, name = row[0], row[1]
                dest = self._dir("processing") / name
                try:
                    os.rename(self._dir("incoming") / name, dest)
                except FileNotFoundError:
                    log.warning("spool: %s vanished from incoming/; forgetting it", name)
                    self._set_state(image_id, "lost")
                    continue
                self._set_state(image_id, "processing")
                return SpoolItem(image_id, dest, row[2] or "", row[3] or "", row[4] or "", row[5])

    def _set_state(self, image_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE items SET state = ? WHERE image_id = ?", (state, image_id))

    def crashes(self, image_id: str) -> int:
        """How many times processing this image failed (the process died, or a stage raised)."""
        with self._lock:
            row = self._db.execute("SELECT crashes FROM items WHERE image_id = ?", (image_id,)).fetchone()
        return int(row[0]) if row else 0

    def last_failure(self, image_id: str) -> str | None:
        """What the last failing stage raised; None when every failure was the process dying."""
        with self._lock:
            row = self._db.execute(
                "SELECT last_failure FROM items WHERE image_id = ?", (image_id,)
            ).fetchone()
        return row[0] if row else None

    def record_failure(self, image_id: str, detail: str) -> int:
        """A stage raised on this image: count it, keep why, and put the image back to be tried again.

        Returns the failure count so far (the caller quarantines at its limit)."""
        with self._lock:
            with self._tx() as db:
                db.execute(
                    "UPDATE items SET crashes = crashes + 1, last_failure = ? WHERE image_id = ?",
                    (detail, image_id),
                )
            self.release(image_id)
            return self.crashes(image_id)

    def _row(self, image_id: str) -> tuple[str, str, str, str] | None:
        row = self._db.execute(
            "SELECT name, state, source, original FROM items WHERE image_id = ?", (image_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2] or "", row[3] or "")

    def _move(self, name: str, to_state: str) -> bool:
        """Move `name` from whichever live state holds it to `to_state`; False if it is not there.

        done/ too: the DICOM outputs of a done image can still fail it (appliance/processor.py)."""
        for state in ("processing", "incoming", "done"):
            src = self._dir(state) / name
            try:
                os.rename(src, self._dir(to_state) / name)
                fsync_dir(self._dir(to_state))
                return True
            except FileNotFoundError:
                continue
        return False

    def mark_done(self, image_id: str) -> bool:
        """processing/ -> done/. Idempotent: calling it again (e.g. after a crash) is harmless.

        Returns False only when the spool has never seen this id."""
        with self._lock:
            row = self._row(image_id)
            if row is None:
                return False
            name, state = row[0], row[1]
            if state != "done":
                if self._move(name, "done"):
                    # rename keeps the source's mtime; purge_done counts from the end of processing
                    with contextlib.suppress(OSError):
                        os.utime(self._dir("done") / name)
                self._set_state(image_id, "done")
            return True

    def release(self, image_id: str) -> None:
        """processing/ -> incoming/ (e.g. the backend failed and the image should be tried again)."""
        with self._lock:
            row = self._row(image_id)
            if row is not None and row[1] == "processing":
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._dir("processing") / row[0], self._dir("incoming") / row[0])
                self._set_state(image_id, "incoming")

    def quarantine(self, image_id: str, reason: str, detail: str = "") -> Path | None:
        """A spooled image that cannot be processed: file + <name>.reason.txt into quarantine/."""
        with self._lock:
            row = self._row(image_id)
            if row is None:
                return None
            name, state, source, original = row
            dest = self._dir("quarantine") / name
            if state != "quarantine":
                self._move(name, "quarantine")
                self._set_state(image_id, "quarantine")
            self._write_reason(dest, reason, detail, original or name, source)
            log.warning("quarantined %s (%s): %s %s", original or name, image_id, reason, detail)
            return dest

    def quarantine_file(
        self, path: Path, reason: str, detail: str, source: str, *, move: bool = True
    ) -> Path:
        """A file refused before it got an id (empty, not an image, unreadable, symlink loop...).

        It is moved (or copied, when `move` is False or it is on another filesystem) into quarantine/
        under a time-stamped name; when it cannot be moved or read, only the reason file is written."""
        path = Path(path)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self._dir("quarantine") / f"{stamp}-{path.name}"
        with self._lock:
            try:
                if path.is_symlink() or not move:
                    if move:
                        os.rename(path, dest)  # the link itself, never its target
                    elif path.is_file() and path.stat().st_size <= QUARANTINE_COPY_MAX_BYTES:
                        self._place(path, dest, move=False)
                    elif path.is_file():  # a huge file on read-only media: its reason, not a copy
                        detail = (
                            f"{detail} (not copied: {path.stat().st_size / 2**20:.0f} MB; left at source)"
                        )
                else:
                    self._place(path, dest, move=True)
            except SpoolFull:
                raise
            except OSError as exc:
                detail = f"{detail} (file left at source: {exc.strerror or exc})"
            self._write_reason(dest, reason, detail, str(path), source)
        log.warning("quarantined %s from %s: %s %s", path, source, reason, detail)
        return dest

    def _write_reason(self, dest: Path, reason: str, detail: str, original: str, source: str) -> None:
        # One field a line: a newline in a file name must not forge one ("reason: ok"), and the
        # undecodable bytes of a name must not make the UTF-8 write fail.
        reason, detail, source, original = map(printable, (reason, detail, source, original))
        text = (
            f"reason: {reason}\ndetail: {detail}\nsource: {source}\noriginal: {original}\ntime: {now_iso()}\n"
        )
        write_atomically(dest.with_name(dest.name + ".reason.txt"), text.encode(), tmp_dir=self._dir("tmp"))

    # -- start-up and housekeeping -------------------------------------------------------------
    def recover(self) -> int:
        """After a crash: processing/ -> incoming/, and register files whose row was never committed.

        Returns how many images were put back into incoming/."""
        back: list[str] = []
        with self._lock:
            for leftover in self._dir("tmp").iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
            for state in ("incoming", "processing", "done", "quarantine"):
                for file in sorted(self._dir(state).iterdir()):
                    image_id = file.name.split(".", 1)[0]
                    row = self._row(image_id)
                    if state == "quarantine" and (row is None or file.name.endswith(".reason.txt")):
                        continue  # reason files and files refused before they had an id
                    if row is None:
                        self._register_orphan(file, image_id, state)
                    if state == "processing":
                        os.rename(file, self._dir("incoming") / file.name)
                        self._set_state(image_id, "incoming")
                        with self._tx() as db:
                            db.execute(
                                "UPDATE items SET crashes = crashes + 1 WHERE image_id = ?", (image_id,)
                            )
                        back.append(image_id)
                    elif row is not None and row[1] != state:
                        self._set_state(image_id, state)
            if back:
                fsync_dir(self._dir("incoming"))
        if back:
            log.warning("spool recovery: %d image(s) back from processing/ to incoming/", len(back))
        return len(back)

    def _register_orphan(self, file: Path, image_id: str, state: str) -> None:
        """A file renamed into the spool just before a crash, before its row was written."""
        meta_path = self._dir("meta") / f"{image_id}.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {
                "key": f"sha256:{content_sha256(file)}",
                "source": "",
                "original": "",
                "accepted_at": now_iso(),
            }
        with self._tx() as db:
            # A retry whose row was never written: the failed attempt's row still holds the key.
            db.execute(
                "UPDATE items SET key = key || '#' || image_id WHERE key = ? AND image_id != ?"
                f" AND state IN {_RETRY_STATES}",
                (meta["key"], image_id),
            )
            db.execute(
                "INSERT OR IGNORE INTO items (key, image_id, name, state, source, original, accepted_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    meta["key"],
                    image_id,
                    file.name,
                    state,
                    meta.get("source"),
                    meta.get("original"),
                    meta.get("accepted_at"),
                ),
            )

    def pending_count(self) -> int:
        """Images accepted and not yet finished (incoming + processing)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM items WHERE state IN ('incoming', 'processing')"
            ).fetchone()
            return int(row[0])

    def sidecar(self, image_id: str) -> dict[str, str] | None:
        try:
            data: dict[str, str] = json.loads((self._dir("meta") / f"{image_id}.json").read_text("utf-8"))
            return data
        except (OSError, ValueError):
            return None

    def purge_quarantine(self, older_than_s: float) -> int:
        """Delete refused files and their reason files older than `older_than_s`. A key whose file
        is gone stays a retry state: the image sent again is analysed again."""
        with self._lock:
            return len(purge_older(self._dir("quarantine"), older_than_s))

    def scrub_records(self, older_than_s: float) -> int:
        """Forget where finished images came from (their original path, which may name the patient)
        and delete their meta files; only the de-duplication key and the id stay. Returns how many."""
        cutoff = datetime.fromtimestamp(time.time() - older_than_s, timezone.utc).isoformat(
            timespec="milliseconds"
        )
        with self._lock:
            rows = self._db.execute(
                "SELECT image_id FROM items WHERE state NOT IN ('incoming', 'processing')"
                " AND accepted_at < ? AND original IS NOT NULL",
                (cutoff,),
            ).fetchall()
            for (image_id,) in rows:
                with contextlib.suppress(FileNotFoundError):
                    (self._dir("meta") / f"{image_id}.json").unlink()
            with self._tx() as db:
                db.executemany("UPDATE items SET original = NULL WHERE image_id = ?", rows)
        return len(rows)

    def purge_done(self, older_than_s: float) -> int:
        """Delete processed files older than `older_than_s` (their key stays: a re-send is still a duplicate)."""
        cutoff = datetime.now().timestamp() - older_than_s
        removed = 0
        with self._lock:
            for file in self._dir("done").iterdir():
                with contextlib.suppress(OSError):
                    if file.stat().st_mtime < cutoff:
                        file.unlink()
                        removed += 1
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()
