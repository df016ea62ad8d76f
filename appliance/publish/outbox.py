"""A durable on-disk outbox: every message is committed before it is sent, and stays until the broker acked it.

SQLite in WAL mode with synchronous=FULL, so a `put` that returned survives kill -9 and power loss. One
exception, on purpose: the processor's transaction for an image (`Store.transaction(wake_first=True)`)
wakes the sender before its commit is on disk. A power cut in that millisecond can lose a result that
went out; the image is then still in processing/ and is analysed and sent again under the same
message_id (image id + model), which subscribers drop. Only a model changed during that very restart
would send it under another id.
Rows are sent in id order (so per-topic order holds) and marked `acked` only when the broker's
PUBACK arrived. On start every row still `pending` is sent again; subscribers de-duplicate on the
message_id inside the payload.

Acked rows keep a tombstone (topic, message_id, no payload) for `keep_sent_seconds`, which makes
`put` idempotent: after a crash the pipeline may put the same result again and nothing goes out twice.

The bound (`max_pending`, MqttConfig.outbox_max) is enforced at `put`. Policy, in this order:
  1. retained rows superseded by a newer pending row on the same topic (e.g. an old `latest/<bed>`:
     only the newest is worth sending for a retained topic), oldest first;
  2. the oldest pending rows of any kind.
Each drop is logged at ERROR with its topic and message_id and counted (persistently: `dropped`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import MqttConfig
from appliance.store import Store, store_at

log = logging.getLogger(__name__)

PENDING, ACKED, DROPPED, REJECTED = "pending", "acked", "dropped", "rejected"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic       TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    payload     BLOB,
    qos         INTEGER NOT NULL,
    retain      INTEGER NOT NULL,
    created_at  REAL    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending',
    done_at     REAL,
    UNIQUE (topic, message_id)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_topic ON outbox (topic, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS outbox_done ON outbox (done_at) WHERE state != 'pending';
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


# Where an older version kept the outbox, a database of its own in the spool folder (see `adopt`).
LEGACY_OUTBOX = "outbox.sqlite3"
_ROW = "topic, message_id, payload, qos, retain, created_at, state, done_at"


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    message_id: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float


class Outbox:
    """Thread-safe: the pipeline puts, the publisher's drain thread reads and acks."""

    def __init__(
        self, store: Store | Path, max_pending: int = 100_000, keep_sent_seconds: float = 7 * 86400
    ) -> None:
        """`store`: the daemon's Store, or the path of a database to open (then closed with the outbox)."""
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.store, self._owns_store = store_at(store, "outbox")
        self.path = self.store.path
        self.max_pending = max_pending
        self.keep_sent_seconds = keep_sent_seconds
        self._lock = self.store.lock
        self._db = self.store.db
        with self._lock:
            self._db.executescript(_SCHEMA)
        self._listeners: list[Callable[[], None]] = []
        self._changed = threading.Condition()
        self.prune_sent()

    @classmethod
    def from_config(cls, store: Store | Path, config: MqttConfig) -> Outbox:
        """The daemon's outbox: bounded by mqtt.outbox_max."""
        return cls(store, max_pending=config.outbox_max)

    # -- writing -------------------------------------------------------------------------------
    def put(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, *, message_id: str
    ) -> bool:
        """Store a message for sending. False if (topic, message_id) was already stored (or sent)."""
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        with self.store.transaction():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO outbox (topic, message_id, payload, qos, retain, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (topic, message_id, data, int(qos), int(bool(retain)), time.time()),
            )
            added = cur.rowcount == 1
            if added:
                self._enforce_bound()
                self.store.after_commit(self._notify, before_sync=True)
        return added

    def put_many(self, messages: Iterable[tuple[str, bytes | str, int, bool, str]]) -> int:
        """Several (topic, payload, qos, retain, message_id) in one transaction: all or none on disk."""
        now = time.time()
        added = 0
        with self.store.transaction():
            for topic, payload, qos, retain, message_id in messages:
                data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO outbox (topic, message_id, payload, qos, retain, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (topic, message_id, data, int(qos), int(bool(retain)), now),
                )
                added += cur.rowcount
            if added:
                self._enforce_bound()
                self.store.after_commit(self._notify, before_sync=True)
        return added

    def _enforce_bound(self) -> None:
        excess = self._pending_count() - self.max_pending
        if excess <= 0:
            return
        superseded = self._db.execute(
            "SELECT o.id, o.topic, o.message_id FROM outbox o WHERE o.state = 'pending' AND o.retain = 1"
            " AND EXISTS (SELECT 1 FROM outbox n WHERE n.topic = o.topic AND n.state = 'pending' AND n.id > o.id)"
            " ORDER BY o.id LIMIT ?",
            (excess,),
        ).fetchall()
        victims = [(*row, "superseded retained state") for row in superseded]
        if len(victims) < excess:
            chosen = {row[0] for row in victims}
            oldest = self._db.execute(
                "SELECT id, topic, message_id FROM outbox WHERE state = 'pending' ORDER BY id LIMIT ?",
                (excess + len(chosen),),
            ).fetchall()
            victims += [(*row, "oldest unsent") for row in oldest if row[0] not in chosen][
                : excess - len(victims)
            ]
        now = time.time()
        for row_id, topic, message_id, why in victims:
            self._db.execute(
                "UPDATE outbox SET state = ?, payload = NULL, done_at = ? WHERE id = ?",
                (DROPPED, now, row_id),
            )
            log.error(
                "OUTBOX FULL (%d pending, bound %d): dropped %s message %s on %s",
                self.max_pending + excess,
                self.max_pending,
                why,
                message_id,
                topic,
            )
        self._bump("dropped", len(victims))

    # -- sending -------------------------------------------------------------------------------
    def pending(self, after_id: int = 0, limit: int = 100) -> list[OutboxRow]:
        """Rows still to be acknowledged, in id (= sending) order, with id > after_id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, message_id, payload, qos, retain, created_at FROM outbox"
                " WHERE state = 'pending' AND id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6]) for r in rows]

    def mark_acked(self, row_ids: Iterable[int]) -> None:
        self._finish(row_ids, ACKED)

    def mark_rejected(self, row_ids: Iterable[int], reason: str) -> None:
        """The broker answered with a failure code (e.g. not authorised): retrying cannot help."""
        ids = list(row_ids)
        self._finish(ids, REJECTED, counter="rejected")
        log.error("broker refused %d outbox message(s): %s", len(ids), reason)

    def _finish(self, row_ids: Iterable[int], state: str, counter: str | None = None) -> None:
        ids = [(state, time.time(), i) for i in row_ids]
        if not ids:
            return
        # Not waited for on disk: an ack lost in a power cut means the message is sent again, which
        # subscribers already expect (at least once; they de-duplicate on the message id).
        with self.store.transaction(durable=False):
            self._db.executemany(
                "UPDATE outbox SET state = ?, payload = NULL, done_at = ? WHERE id = ? AND state = 'pending'",
                ids,
            )
            if counter:
                self._bump(counter, len(ids))
        self._notify()

    # -- state ---------------------------------------------------------------------------------
    def depth(self) -> int:
        """Messages waiting for the broker's acknowledgement."""
        with self._lock:
            return self._pending_count()

    def oldest_pending_age(self) -> float:
        """Seconds the oldest unacknowledged message has waited; 0 when none waits (for monitoring)."""
        with self._lock:
            # Rows are sent in id order, so the lowest pending id is the one holding the others up
            # (and the partial index makes this one lookup even with 100 000 rows pending).
            row = self._db.execute(
                "SELECT created_at FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 1"
            ).fetchone()
        return max(0.0, time.time() - float(row[0])) if row else 0.0

    def _pending_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0])

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def dropped(self) -> int:
        """Messages dropped because the bound was reached, since the outbox was created."""
        return self.counter("dropped")

    def state_of(self, topic: str, message_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM outbox WHERE topic = ? AND message_id = ?", (topic, message_id)
            ).fetchone()
        return str(row[0]) if row else None

    def wait_empty(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self.depth() > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(0.5 if left is None else min(left, 0.5))
        return True

    def prune_sent(self) -> int:
        """Forget tombstones of sent/dropped rows older than keep_sent_seconds."""
        with self.store.transaction():
            cur = self._db.execute(
                "DELETE FROM outbox WHERE state != 'pending' AND done_at < ?",
                (time.time() - self.keep_sent_seconds,),
            )
        return cur.rowcount

    def adopt(self, legacy: Path) -> int:
        """The rows of the outbox.sqlite3 an older version kept in the spool folder, moved into the store:
        messages not yet acknowledged are still sent, tombstones still make `put` idempotent."""

        def copy(db: sqlite3.Connection) -> int:
            if not db.execute("SELECT 1 FROM legacy.sqlite_master WHERE name = 'outbox'").fetchone():
                return 0
            copied = db.execute(
                f"INSERT OR IGNORE INTO outbox ({_ROW}) SELECT {_ROW} FROM legacy.outbox ORDER BY id"
            ).rowcount
            if db.execute("SELECT 1 FROM legacy.sqlite_master WHERE name = 'counters'").fetchone():
                for name, value in db.execute("SELECT name, value FROM legacy.counters").fetchall():
                    self._bump(name, int(value))
            return int(copied)

        return self.store.adopt(legacy, copy)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (without locks held) after rows were added or finished: wakes the sender."""
        self._listeners.append(callback)

    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    # -- helpers -------------------------------------------------------------------------------
    def _bump(self, name: str, by: int) -> None:
        if by:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
        for callback in self._listeners:
            callback()
