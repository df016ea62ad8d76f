"""The appliance's one database: spool state, journal and MQTT outbox in one SQLite file (WAL).

One image's state change (its result, the messages that carry it, its spool state) is one transaction,
so one fsync, instead of one per database. The spool (appliance/ingest/spool.py), the journal
(appliance/journal.py) and the outbox (appliance/publish/outbox.py) each own their tables and share the
daemon's Store; opened on their own (tools, tests) each opens a Store of its own at the path given.

Transactions nest: an inner one joins the outer, and work that must follow the commit (a spool file
renamed into done/, a sender woken) is queued with `after_commit` and runs once the outermost commits.
`durable=False` commits without waiting for the disk: what such a transaction says may be lost on a
power cut (never on kill -9) and must be safe to lose: the next durable commit carries it with it.
`wake_first=True` commits, runs the actions queued with `before_sync=True` (waking the MQTT sender: its
messages carry ids derived from the image, so one sent and then lost in a power cut is sent again under
the same id and de-duplicated by subscribers), then waits for the disk, then runs the rest (the file
moves, which must never get ahead of the rows that explain them). The ward hears a result while the
commit is still on its way to the disk instead of after it (~1.5 ms of an image's 30 here).
`before_durable` queues what must be on disk no later than the transaction (the spool's folder syncs,
see appliance/ingest/spool_accept.py): it runs just before COMMIT, in every mode (after COMMIT another
thread's durable commit could carry the rows to the disk first); if it raises, the transaction rolls back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

from appliance.errors import UserError

log = logging.getLogger(__name__)


class Store:
    """One connection behind one lock, shared by the threads of the process (loop, watcher, sender)."""

    def __init__(self, path: Path, what: str = "database", *, read_only: bool = False) -> None:
        """`read_only`: for the commands that only read (history, feedback export), run by a user who may
        not write the appliance's folder; nothing is created or changed."""
        self.path = Path(path)
        self.lock = threading.RLock()
        self._durable = True
        self._after_commit: list[tuple[Callable[[], None], bool]] = []  # (action, before_sync)
        self._before_durable: list[Callable[[], None]] = []
        self._wal_fd: int | None = None  # see sync()
        if read_only:
            self.db = _open_read_only(self.path, what)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            # A scrubbed original path (it may name the patient) is overwritten on disk, not just freed.
            self.db.execute("PRAGMA secure_delete=ON")
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"{what} {self.path}: cannot open: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True, wake_first: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); joins the transaction already open.

        `wake_first` (with `durable`): the `before_sync` actions run before the commit is waited for on
        disk, the others after it (see the module's docstring)."""
        with self.lock:
            if self.db.in_transaction:
                yield self.db
                return
            sync_at_commit = durable and not wake_first
            if sync_at_commit != self._durable:  # only between transactions; consulted at COMMIT
                self.db.execute(f"PRAGMA synchronous={'FULL' if sync_at_commit else 'NORMAL'}")
                self._durable = sync_at_commit
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                _settle(self._before_durable)
                self.db.execute("COMMIT")
            except BaseException:
                self._after_commit.clear()
                self._before_durable.clear()
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
                raise
            actions, self._after_commit = self._after_commit, []
        # Outside the lock: a rename must not hold up the other threads, nor the sender wait for the disk.
        if durable and wake_first:
            _run([action for action, before_sync in actions if before_sync])
            self.sync()
            _run([action for action, before_sync in actions if not before_sync])
        else:
            _run([action for action, _ in actions])

    def sync(self) -> None:
        """Wait until every committed transaction is on disk. In WAL mode a commit is a set of frames
        appended to the -wal file; a checkpoint syncs them before it copies them into the database, so
        syncing the -wal file covers every transaction committed so far (SQLite's own FULL commit syncs
        the same file). The file is SQLite's (the database's real path, links resolved, as SQLite names
        it), kept open from its first sync on: a descriptor opened after a write-back error would not
        hear of it (Linux reports such an error once to each descriptor open when it happened)."""
        with self.lock:
            if self._wal_fd is None:
                wal = f"{os.path.realpath(self.path)}-wal"
                try:
                    self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError as exc:  # SQLite keeps it while a connection is open
                    raise OSError(errno.ENOENT, f"{wal}: SQLite's write-ahead log is missing") from exc
            fd = self._wal_fd
        os.fsync(fd)  # outside the lock: the other threads' transactions go on meanwhile

    def after_commit(self, action: Callable[[], None], *, before_sync: bool = False) -> None:
        """Run `action` once the current transaction commits (at once when none is open).

        `before_sync`: safe to run before the commit is on disk (see the module's docstring)."""
        with self.lock:
            if self.db.in_transaction:
                self._after_commit.append((action, before_sync))
                return
        action()

    def before_durable(self, action: Callable[[], None]) -> None:
        """Run `action` just before the current transaction commits (at once when none is open); an
        exception from it rolls the transaction back and is raised to its caller."""
        with self.lock:
            if self.db.in_transaction:
                self._before_durable.append(action)
                return
        action()

    def adopt(self, legacy: Path, copy: Callable[[sqlite3.Connection], int]) -> int:
        """Take over a database an older version kept apart (the spool's, the outbox's): `copy` moves its
        rows from schema `legacy` into this store in one transaction, then the old file is deleted (it
        may hold original paths naming patients). Returns what `copy` says it copied; 0 when none."""
        legacy = Path(legacy)
        if not legacy.is_file() or legacy.resolve() == self.path.resolve():
            return 0
        with self.lock:
            self.db.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
            try:
                with self.transaction():
                    copied = copy(self.db)
            finally:
                self.db.execute("DETACH DATABASE legacy")
        for leftover in (
            legacy,
            legacy.with_name(legacy.name + "-wal"),
            legacy.with_name(legacy.name + "-shm"),
        ):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        log.warning("%s: %d row(s) moved into %s; the old file is deleted", legacy, copied, self.path)
        return copied

    def integrity_check(self) -> list[str]:
        """PRAGMA integrity_check: [] when the database is sound, else SQLite's complaints."""
        with self.lock:
            rows = [str(r[0]) for r in self.db.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else rows

    def close(self) -> None:
        with self.lock:
            self.db.close()
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None


def _run(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        try:
            action()
        except Exception:  # committed state is the truth; the spool's recovery redoes file moves
            log.exception("store: an action after a commit failed")


def _settle(actions: list[Callable[[], None]]) -> None:
    """Each once, in order; the first exception stops them (what must precede the disk did not)."""
    pending = list(actions)
    actions.clear()
    for action in pending:
        action()


def store_at(store: Store | Path, what: str, *, read_only: bool = False) -> tuple[Store, bool]:
    """The store to use and whether its user owns it (opened it here, so closes it)."""
    if isinstance(store, Store):
        return store, False
    return Store(Path(store), what, read_only=read_only), True


def _open_read_only(path: Path, what: str) -> sqlite3.Connection:
    """Read without writing anything. While the daemon runs, SQLite reads its WAL through the shared
    -shm file; with no daemon (no -wal file: the last writer checkpointed and removed it) a read-only
    connection cannot make the -shm it wants in a folder it may not write, and the file is read as the
    whole, unchanging database it then is (`immutable`)."""
    base = f"file:{urllib.parse.quote(os.path.abspath(path))}"
    last: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        if mode == "immutable=1" and os.path.exists(f"{path}-wal"):
            break  # a writer is (or was) there: never read around its log
        try:
            db = sqlite3.connect(
                f"{base}?{mode}", uri=True, timeout=30, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA query_only=ON")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.Error as exc:
            last = exc
    raise UserError(f"{what} {path}: cannot open to read: {last}")
