"""A durable spool: incoming/ -> processing/ -> done/ | quarantine/, one stable image id per file.

The `items` table of the appliance's store (appliance/store.py) is the truth about an image's state and
remembers every key ever accepted (SOPInstanceUID + dataset hash, or content hash) for de-duplication
and the order of arrival; the folder a file lies in follows it. Files move by atomic renames inside the
spool's filesystem (files from elsewhere are first copied to tmp/ and fsynced); a move to done/ or
quarantine/ happens after the transaction that decided it committed (with the image's journal row and
outbox messages, when the processor wraps them in one). `recover()` (call it at start) puts what a killed
process left in processing/ back into incoming/ (counted against the image), finishes moves a crash cut
short, registers files whose row was never committed and forgets rows whose file a power cut sent back
to the folder it came from (appliance/ingest/spool_accept.py: when a placement is synced).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from appliance.config import AppConfig
from appliance.errors import InputRejected
from appliance.ingest import reasons, sniff
from appliance.ingest.identity import plain_file_refusal
from appliance.ingest.spool_accept import admit
from appliance.ingest.spool_files import SpoolFolders
from appliance.ingest.spool_keys import FileIdentity, match, remember_hashes
from appliance.ingest.spool_records import (
    ADDED_COLUMNS,
    LEGACY_DB,
    RETRY_STATES,
    SCHEMA,
    SPOOL_ERRORS,
    Accepted,
    Duplicate,
    Rejected,
    SpoolFull,
    SpoolItem,
)
from appliance.ingest.spool_recovery import adopt, recover
from appliance.pseudonym import image_id_secret, load_or_create_salt
from appliance.store import Store, store_at

log = logging.getLogger(__name__)


class Spool:
    def __init__(
        self,
        root: Path,
        *,
        store: Store | None = None,
        min_free_mb: float = 0.0,
        id_secret: bytes | None = None,
    ) -> None:
        """`store`: the daemon's Store; without one (tools, tests) the spool keeps its own spool.db.

        `id_secret`: the key of the image ids (PatientKeys.image_id_secret(), from the site salt). A
        spool opened without one (tools, tests) keys them with a secret file of its own, never unkeyed."""
        self.root = Path(root)
        self.files = SpoolFolders(self.root, min_free_mb)
        self._device = self.root.stat().st_dev  # files on it may be hashed through a memory map
        self._id_secret = id_secret or load_or_create_salt(self.root / "image-id.key", what="spool id key")
        self.store, self._owns_store = store_at(store or self.root / LEGACY_DB, "spool")
        self._lock = self.store.lock
        self._db = self.store.db
        # Files renamed into incoming/ unsynced (spool_accept.py): placements counted, and how many of
        # them the last folder sync covered. `_counts` guards both and is never held across I/O;
        # `_syncing` lets one folder sync run at a time (never taken while holding `_counts`).
        self._placed = self._settled = 0
        self._counts = threading.Lock()
        self._syncing = threading.Lock()
        self._sync_failed: str | None = None  # see settle_placements
        with self._lock:
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in columns:
                    self._db.execute(f"ALTER TABLE items ADD COLUMN {column} {kind}")

    @classmethod
    def from_config(cls, config: AppConfig, store: Store) -> Spool:
        """The appliance's spool (the daemon's, and the USB import's in a process of its own): rows in the
        appliance's store, the disk reserve, image ids keyed from the site salt; an older version's
        spool.db adopted."""
        ingest = config.ingest
        spool = cls(
            ingest.spool, store=store, min_free_mb=ingest.min_free_mb, id_secret=image_id_secret(config)
        )
        spool.adopt(ingest.spool / LEGACY_DB)
        return spool

    # -- helpers -------------------------------------------------------------------------------
    @property
    def min_free_mb(self) -> float:
        return self.files.min_free_mb

    def free_mb(self) -> float:
        return self.files.free_mb()

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        try:
            with self.store.transaction(durable=durable) as db:
                yield db
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):
                raise SpoolFull(f"spool {self.root}: disk full writing the database (ENOSPC: {exc})") from exc
            raise

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
            st = path.stat()  # not a link (refused above): the file itself
        except InputRejected as exc:
            where = self.quarantine_file(path, exc.reason, exc.detail, source, move=move)
            return Rejected(exc.reason, exc.detail, where)
        self.files.check_space(st.st_size)
        try:
            file = FileIdentity.of(path, kind, self._device)
        except PermissionError as exc:
            detail = f"{path.name}: {exc.strerror}"
            return Rejected(
                reasons.PERMISSION_DENIED,
                detail,
                self.quarantine_file(path, reasons.PERMISSION_DENIED, detail, source, move=move),
            )
        staged = None
        copied = not move or st.st_dev != self._device
        if copied and self._known(file) is None:
            # Read-only media or another filesystem: the slow copy happens before the store's lock and
            # its write transaction are taken (the loop, the sender, a USB import share them), and only
            # for a file the spool does not already hold.
            staged = self.files.copy_to_tmp(path)
        try:
            return admit(self, path, source, kind, file, move=move, staged=staged)
        finally:
            if staged is not None:  # not taken (a duplicate after all, or an error)
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()

    def placed_unsynced(self) -> None:
        """A file was renamed into incoming/ without a sync of its folder (appliance/ingest/spool_accept.py)."""
        with self._counts:
            self._placed += 1

    def settle_placements(self) -> None:
        """Sync incoming/ and processing/ (where a claim renamed the file) if a placement waits for it;
        a sync already running is waited for. The loop calls it after each claim, beside the read.

        A failed sync fails every later one until a restart: Linux reports a write-back error once, so a
        retry on a new descriptor could succeed with the renames still not on disk (recover() at the
        next start syncs the folders as they are then)."""
        with self._syncing:
            if self._sync_failed is not None:
                raise OSError(
                    errno.EIO,
                    f"an earlier sync of the spool's folders failed ({self._sync_failed});"
                    " check the disk and restart the appliance",
                )
            with self._counts:
                placed = self._placed
                if placed <= self._settled:
                    return
            try:
                self.files.sync_live()
            except OSError as exc:
                self._sync_failed = exc.strerror or str(exc)
                raise
            with self._counts:
                self._settled = max(self._settled, placed)

    def _settled_before_durable(self) -> None:
        """Called inside a transaction that ends an image: its file's folders reach the disk first (done
        at the claim already, normally)."""
        with self._counts:
            waiting = self._placed > self._settled
        if waiting:
            self.store.before_durable(self.settle_placements)

    def _known(self, file: FileIdentity) -> str | None:
        """The state of the live row this file is (None: new, or only a retry state holds it)."""
        with self._lock:
            _, row = match(self, file)
        return None if row is None or row[1] in RETRY_STATES else row[1]

    # -- the pipeline side ---------------------------------------------------------------------
    def claim(self, n: int = 1) -> list[SpoolItem]:
        """Up to `n` of the oldest waiting files (a batch for the backend), each moved to processing/."""
        items: list[SpoolItem] = []
        # Not waited for on disk: a claim lost in a power cut leaves the file in processing/, which
        # recover() hands back like any other interrupted image.
        with self._tx(durable=False):
            while len(items) < n:
                item = self.claim_next()
                if item is None:
                    break
                items.append(item)
        return items

    def claim_next(self) -> SpoolItem | None:
        """Oldest file in incoming/ -> processing/; None when nothing waits."""
        with self._tx(durable=False):
            while True:
                row = self._db.execute(
                    "SELECT image_id, name, source, original, accepted_at, key FROM items"
                    " WHERE state = 'incoming' ORDER BY seq LIMIT 1"
                ).fetchone()
                if row is None:
                    return None
                image_id, name = row[0], row[1]
                dest = self.files.dir("processing") / name
                try:
                    os.rename(self.files.dir("incoming") / name, dest)
                except FileNotFoundError:
                    # Already in processing/: a claim whose transaction was rolled back moved it.
                    if not dest.exists():
                        log.warning("spool: %s vanished from incoming/; forgetting it", name)
                        self._set_state(image_id, "lost")
                        continue
                self._set_state(image_id, "processing")
                return SpoolItem(image_id, dest, row[2] or "", row[3] or "", row[4] or "", row[5])

    def _set_state(self, image_id: str, state: str, *, durable: bool = True) -> None:
        with self._tx(durable=durable) as db:
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

    def mark_done(self, image_id: str) -> bool:
        """processing/ -> done/, once the transaction saying so commits (the processor's, with the
        journal row and the outbox messages, when it holds one open). Idempotent.

        Returns False only when the spool has never seen this id."""
        with self._tx() as db:
            row = self._row(image_id)
            if row is None:
                return False
            if row[1] != "done":
                db.execute("UPDATE items SET state = 'done' WHERE image_id = ?", (image_id,))
                self._settled_before_durable()
                self.store.after_commit(lambda: self.files.file_done(row[0]))
            return True

    def hand_back(self, image_ids: Iterable[str]) -> None:
        """`release` each, as far as the disk and database let it: one that cannot go back stays in
        processing/, and recover() hands it back (counted as a crash) at the next start."""
        for image_id in image_ids:
            with contextlib.suppress(*SPOOL_ERRORS):
                self.release(image_id)

    def release(self, image_id: str) -> None:
        """processing/ -> incoming/ (e.g. the backend failed and the image should be tried again)."""
        with self._lock:
            row = self._row(image_id)
            if row is not None and row[1] == "processing":
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.files.dir("processing") / row[0], self.files.dir("incoming") / row[0])
                self._set_state(image_id, "incoming", durable=False)

    def quarantine(self, image_id: str, reason: str, detail: str = "") -> Path | None:
        """A spooled image that cannot be processed: file + <name>.reason.txt into quarantine/ (after
        the transaction saying so commits; the reason is kept in its row for recover())."""
        with self._tx() as db:
            row = self._row(image_id)
            if row is None:
                return None
            name, _, source, original = row
            refusal = f"{reason}\n{detail}"
            db.execute(
                "UPDATE items SET state = 'quarantine', refusal = ? WHERE image_id = ?", (refusal, image_id)
            )
            self._settled_before_durable()
            self.store.after_commit(lambda: self.files.file_refused(name, refusal, original or name, source))
        log.warning("quarantined %s (%s): %s %s", original or name, image_id, reason, detail)
        return self.files.dir("quarantine") / name

    def quarantine_file(
        self, path: Path, reason: str, detail: str, source: str, *, move: bool = True
    ) -> Path:
        """A file refused before it got an id: into quarantine/ with its reason (SpoolFolders.refuse)."""
        return self.files.refuse(path, reason, detail, source, move=move)

    # -- start-up and housekeeping -------------------------------------------------------------
    def recover(self) -> int:
        """After a crash: the folders made to agree with the rows again (appliance/ingest/spool_recovery.py).

        Returns how many images were put back into incoming/ from processing/."""
        with self._lock:
            return recover(self)

    def adopt(self, legacy: Path) -> int:
        """The rows of the spool.db an older version kept in the spool folder, moved into the store."""
        return adopt(self, legacy)

    def pending_count(self) -> int:
        """Images accepted and not yet finished (incoming + processing)."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM items WHERE state IN ('incoming', 'processing')"
            ).fetchone()
            return int(row[0])

    def accepted_at(self, image_id: str) -> str | None:
        """When the spool accepted this image (ISO 8601, UTC); None when it does not know it."""
        with self._lock:
            row = self._db.execute("SELECT accepted_at FROM items WHERE image_id = ?", (image_id,)).fetchone()
        return row[0] if row else None

    def purge_quarantine(self, older_than_s: float) -> int:
        """Delete refused files and their reason files older than `older_than_s`. A key whose file
        is gone stays a retry state: the image sent again is analysed again."""
        return self.files.purge_quarantine(older_than_s)

    def scrub_records(self, older_than_s: float) -> int:
        """Forget where finished images came from (their original path, which may name the patient);
        only the de-duplication key and the id stay. Returns how many."""
        cutoff = datetime.fromtimestamp(time.time() - older_than_s, timezone.utc).isoformat(
            timespec="milliseconds"
        )
        with self._tx() as db:
            scrubbed = db.execute(
                "UPDATE items SET original = NULL WHERE state NOT IN ('incoming', 'processing')"
                " AND accepted_at < ? AND original IS NOT NULL",
                (cutoff,),
            ).rowcount
        return int(scrubbed)

    def purge_done(self, older_than_s: float) -> int:
        """Delete processed files older than `older_than_s` (their key stays: a re-send is still a duplicate)."""
        return self.files.purge_done(older_than_s, keep=remember_hashes(self))

    def close(self) -> None:
        if self._owns_store:
            self.store.close()
