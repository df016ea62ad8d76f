"""The journal: every image accepted, its result and the acknowledgements from ward displays (SQLite, WAL).

Crash recovery leans on it. The pipeline writes journal -> outbox -> spool.mark_done; after a crash
anywhere in between, `result_for(image_id)` returns the stored result, so the image is not inferred
again and re-putting it into the (idempotent) outbox sends nothing twice. `record_result` is
idempotent per image_id: the first result stored for an image is the one that counts.

It is also the patient history behind trends (`priors`) and `cxr-appliance history`. Patients are
known only by their salted pseudonymous key; the journal holds no name or patient ID either.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.clock import now_iso
from appliance.config import JournalConfig
from appliance.result import Acknowledgement, Result
from appliance.store import Store, store_at

log = logging.getLogger(__name__)

# A result is acknowledged once or twice in practice; the cap stops a misbehaving display (which may
# write acks) from growing the journal without bound under one message id.
MAX_ACKS_PER_RESULT = 20
FEEDBACK_COLUMNS = (
    "message_id",
    "image_id",
    "patient_key",
    "acquired_at",
    "triage",
    "abnormal",
    "by",
    "at",
    "display",
    "verdict",
    "comment",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    image_id     TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    accepted_at  TEXT NOT NULL,
    state        TEXT NOT NULL,
    reason       TEXT,
    updated_ts   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    message_id   TEXT PRIMARY KEY,
    image_id     TEXT NOT NULL UNIQUE,
    patient_key  TEXT,
    location     TEXT NOT NULL,
    acquired_at  TEXT,
    acquired_ts  REAL NOT NULL,
    triage       TEXT,
    status       TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    created_ts   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_patient ON results (patient_key, acquired_ts);
CREATE INDEX IF NOT EXISTS results_created ON results (created_ts);
CREATE TABLE IF NOT EXISTS acknowledgements (
    message_id   TEXT NOT NULL,
    by           TEXT NOT NULL,
    at           TEXT NOT NULL,
    display      TEXT,
    received_at  TEXT NOT NULL,
    verdict      TEXT,
    comment      TEXT,
    UNIQUE (message_id, by, at)
);
CREATE INDEX IF NOT EXISTS acks_message ON acknowledgements (message_id);
"""


def to_timestamp(value: str | datetime | None) -> float | None:
    """ISO 8601 (or datetime) to UTC epoch seconds; naive times are taken as UTC. None if unparsable."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


class Journal:
    """Thread-safe (one connection behind a lock): the pipeline writes results, MQTT writes acks."""

    def __init__(
        self,
        store: Store | Path,
        *,
        retention_days: float = 90,
        retention_count: int = 100_000,
        read_only: bool = False,
    ) -> None:
        """`store`: the daemon's Store, or the path of the database to open (then closed with the journal).
        `read_only`: for the commands that only read (history, feedback export): the path opened without
        writing anything (the tables are the daemon's to make)."""
        self.store, self._owns_store = store_at(store, "journal", read_only=read_only)
        self.path = self.store.path
        self.retention_days = retention_days
        self.retention_count = retention_count
        self._lock = self.store.lock
        self._db = self.store.db
        if read_only:
            return
        with self._lock:
            self._db.executescript(_SCHEMA)
            # Journals from before clinician feedback: add its columns (NULL for the old acks).
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(acknowledgements)")}
            for column in ("verdict", "comment"):
                if column not in columns:
                    self._db.execute(f"ALTER TABLE acknowledgements ADD COLUMN {column} TEXT")

    @classmethod
    def from_config(cls, config: JournalConfig, store: Store | None = None) -> Journal:
        return cls(
            store or config.path, retention_days=config.retention_days, retention_count=config.retention_count
        )

    # -- results -------------------------------------------------------------------------------
    def record_result(self, result: Result) -> bool:
        """Store the result (and mark its image done). False if this image already has a result."""
        image_id = result.image.image_id
        created_ts = to_timestamp(result.created_at) or time.time()
        acquired_ts = to_timestamp(result.image.acquired_at) or created_ts
        with self.store.transaction():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO results (message_id, image_id, patient_key, location, acquired_at,"
                " acquired_ts, triage, status, payload, created_at, created_ts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    result.message_id,
                    image_id,
                    result.patient_key,
                    result.location,
                    result.image.acquired_at,
                    acquired_ts,
                    result.triage,
                    result.status,
                    result.to_json(),
                    result.created_at,
                    created_ts,
                ),
            )
            added = cur.rowcount == 1
            if added:
                self._db.execute(
                    "INSERT INTO images (image_id, source, accepted_at, state, reason, updated_ts)"
                    " VALUES (?, ?, ?, 'done', ?, ?) ON CONFLICT(image_id) DO UPDATE SET"
                    " state = 'done', reason = excluded.reason, updated_ts = excluded.updated_ts",
                    (image_id, result.image.source, now_iso(), result.reason, time.time()),
                )
        if not added:
            log.debug("journal already holds a result for image %s", image_id)
        return added

    def result_for(self, image_id: str) -> Result | None:
        """The stored result of this image (crash recovery: skip inference, re-put idempotently)."""
        with self._lock:
            row = self._db.execute("SELECT payload FROM results WHERE image_id = ?", (image_id,)).fetchone()
        return Result.model_validate_json(row[0]) if row else None

    def recent(self, limit: int, onnx_sha256: str | None = None) -> list[Result]:
        """The `limit` newest results, oldest first (the drift watch's windows at start); only those of
        this model file when `onnx_sha256` is given. Rows an older payload version wrote are skipped."""
        query = "SELECT payload FROM results"
        params: list[object] = []
        if onnx_sha256 is not None:
            query += " WHERE json_extract(payload, '$.provenance.onnx_sha256') = ?"
            params.append(onnx_sha256)
        query += " ORDER BY created_ts DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*params, limit)).fetchall()
        out = []
        for (payload,) in reversed(rows):
            try:
                out.append(Result.model_validate_json(payload))
            except ValueError:
                log.debug("journal: a result of an older payload version left out")
        return out

    def priors(
        self,
        patient_key: str,
        before_time: str | datetime | None = None,
        limit: int = 10,
        *,
        ok_only: bool = True,
    ) -> list[Result]:
        """Up to `limit` most recent earlier results of this patient, oldest first (for trends).

        `before_time` (ISO 8601 or datetime) excludes the current image and anything after it."""
        before = to_timestamp(before_time) if before_time is not None else float("inf")
        if before is None:
            raise ValueError(f"before_time {before_time!r} is not an ISO 8601 time")
        query = "SELECT payload FROM results WHERE patient_key = ? AND acquired_ts < ?"
        if ok_only:
            query += " AND status = 'ok'"
        query += " ORDER BY acquired_ts DESC, created_ts DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (patient_key, before, limit)).fetchall()
        return [Result.model_validate_json(r[0]) for r in reversed(rows)]

    def history(
        self, limit: int = 50, patient_key: str | None = None, since: str | datetime | None = None
    ) -> list[dict[str, Any]]:
        """Newest first: one flat row per result for `cxr-appliance history`."""
        where: list[str] = []
        params: list[object] = []
        if patient_key is not None:
            where.append("r.patient_key = ?")
            params.append(patient_key)
        if since is not None:
            ts = to_timestamp(since)
            if ts is None:
                raise ValueError(f"since {since!r} is not an ISO 8601 time")
            where.append("r.created_ts >= ?")
            params.append(ts)
        sql = (
            "SELECT r.created_at, r.acquired_at, r.message_id, r.image_id, r.patient_key, r.location,"
            " r.status, r.triage, json_extract(r.payload, '$.text') AS text,"
            " json_extract(r.payload, '$.reason') AS reason,"
            " EXISTS (SELECT 1 FROM acknowledgements a WHERE a.message_id = r.message_id) AS acknowledged"
            " FROM results r"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY r.created_ts DESC, r.rowid DESC LIMIT ?"
        )
        with self._lock:
            cur = self._db.execute(sql, (*params, limit))
            names = [c[0] for c in cur.description]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        for row in rows:
            row["acknowledged"] = bool(row["acknowledged"])
        return rows

    # -- acknowledgements ----------------------------------------------------------------------
    def record_ack(self, ack: Acknowledgement) -> bool:
        """Store a display's acknowledgement; the same one delivered twice is stored once. Dropped (False,
        logged) when the journal holds no result with that message id, or already holds
        MAX_ACKS_PER_RESULT acks of it: displays may write acks, so they are not trusted to name real ones."""
        with self.store.transaction():
            known = self._db.execute(
                "SELECT (SELECT count(*) FROM results WHERE message_id = ?),"
                " (SELECT count(*) FROM acknowledgements WHERE message_id = ?)",
                (ack.message_id, ack.message_id),
            ).fetchone()
            if not known[0]:
                log.warning("dropped an acknowledgement of unknown message %r", ack.message_id)
                return False
            if known[1] >= MAX_ACKS_PER_RESULT:
                log.warning("dropped an acknowledgement of %s: it has %d already", ack.message_id, known[1])
                return False
            cur = self._db.execute(
                "INSERT OR IGNORE INTO acknowledgements"
                " (message_id, by, at, display, received_at, verdict, comment) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ack.message_id, ack.by, ack.at, ack.display, now_iso(), ack.verdict, ack.comment),
            )
        return cur.rowcount == 1

    def acknowledgements(self, message_id: str) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(
                "SELECT message_id, by, at, display, received_at, verdict, comment FROM acknowledgements"
                " WHERE message_id = ? ORDER BY at",
                (message_id,),
            )
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def feedback(self, since: str | None = None) -> list[dict[str, Any]]:
        """Clinician feedback for audit and site recalibration: one row per stored acknowledgement (oldest
        received first) with its result's pseudonymous key, triage and abnormality score (`abnormal`:
        the payload's `abnormal.score`, None when not published). Keys: FEEDBACK_COLUMNS.

        `since` (ISO 8601) keeps acks the appliance received at or after that time: its own clock, not
        the display's `at`, which a display with a wrong clock could set to anything."""
        params: list[object] = []
        where = ""
        if since is not None:
            ts = to_timestamp(since)
            if ts is None:
                raise ValueError(f"since {since!r} is not an ISO 8601 time")
            # received_at is always UTC in one format (now_iso), so text order is time order.
            where = " WHERE a.received_at >= ?"
            params.append(datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds"))
        sql = (
            "SELECT r.message_id, r.image_id, r.patient_key, r.acquired_at, r.triage,"
            " json_extract(r.payload, '$.abnormal.score') AS abnormal,"
            " a.by, a.at, a.display, a.verdict, a.comment"
            " FROM acknowledgements a JOIN results r ON r.message_id = a.message_id"
            + where
            + " ORDER BY a.received_at, a.rowid"
        )
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    # -- upkeep --------------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Drop results older than retention_days and beyond the newest retention_count. Returns count."""
        cutoff = (now if now is not None else time.time()) - self.retention_days * 86400
        with self.store.transaction():
            doomed = (
                "SELECT message_id FROM results WHERE created_ts < ? UNION SELECT message_id FROM results"
            )
            doomed += " WHERE rowid NOT IN (SELECT rowid FROM results ORDER BY created_ts DESC LIMIT ?)"
            params = (cutoff, self.retention_count)
            self._db.execute(f"DELETE FROM acknowledgements WHERE message_id IN ({doomed})", params)
            self._db.execute(
                "DELETE FROM images WHERE image_id IN"
                f" (SELECT image_id FROM results WHERE message_id IN ({doomed}))",
                params,
            )
            removed = self._db.execute(f"DELETE FROM results WHERE message_id IN ({doomed})", params).rowcount
            # Images that never produced a result (quarantined) age out by the same clock.
            self._db.execute(
                "DELETE FROM images WHERE updated_ts < ? AND image_id NOT IN (SELECT image_id FROM results)",
                (cutoff,),
            )
        if removed:
            log.info("journal: pruned %d result(s)", removed)
        return removed

    def integrity_check(self) -> list[str]:
        return self.store.integrity_check()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                table: int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("images", "results", "acknowledgements")
            }

    def close(self) -> None:
        if self._owns_store:
            self.store.close()
