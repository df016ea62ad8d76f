"""SQLite opened the one way the appliance needs it: WAL, synchronous=FULL, usable from several threads.

Shared by the journal and the MQTT outbox. A committed transaction survives kill -9 and power loss.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.errors import UserError


def open_sqlite(path: Path, what: str) -> sqlite3.Connection:
    """Open (creating folders) in autocommit mode; callers serialise access with their own lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"{what} {path}: cannot open: {exc}") from exc
    return db


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); a no-op when a transaction is already open."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self._outer:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
