"""What the spool hands out and keeps: its states, outcomes of accepting, claimed items, the items table."""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

STATES = ("incoming", "processing", "done", "quarantine")
EXTENSIONS = {"dicom": "dcm", "png": "png", "jpeg": "jpg"}
COPY_CHUNK = 1 << 20
# An image sent again while its row is in one of these states was never analysed: it gets another go.
RETRY_STATES = ("quarantine", "lost")


# The spool's own database when it is opened without the appliance's store (and the one an older
# version kept there, adopted into the store at start: `adopt`).
LEGACY_DB = "spool.db"

# A refused file on read-only media is copied into quarantine only up to this size (a 2 GB file
# copied on every restart would fill the spool disk it is meant to protect).
QUARANTINE_COPY_MAX_BYTES = 64 * 2**20


class SpoolFull(ApplianceError):
    """The spool's disk is full (or below the configured reserve): stop accepting, keep the sources."""

    errno = errno.ENOSPC


# What the spool's disk and database can raise: not an image's fault (the image is kept and tried again).
SPOOL_ERRORS = (OSError, sqlite3.Error, SpoolFull)


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


SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    key          TEXT UNIQUE NOT NULL,
    image_id     TEXT UNIQUE NOT NULL,
    name         TEXT NOT NULL,
    state        TEXT NOT NULL,
    source       TEXT,
    original     TEXT,
    accepted_at  TEXT,
    crashes      INTEGER NOT NULL DEFAULT 0,
    last_failure TEXT,
    refusal      TEXT
);
CREATE INDEX IF NOT EXISTS items_waiting ON items (seq) WHERE state = 'incoming';
"""
# Columns added since the first spool databases (ALTERed in when missing). crashes: how often processing
# this image failed (found in processing/ after the process died, or a stage raised): one that keeps
# failing is quarantined, not retried forever. last_failure: why, for the quarantine reason. refusal:
# the quarantine reason, so recovery can write its reason file when a crash cut the move short.
# dataset_hash: BLAKE3 of a DICOM dataset keyed by its UID alone, once it was needed (spool_keys.py).
ADDED_COLUMNS = {
    "crashes": "INTEGER NOT NULL DEFAULT 0",
    "last_failure": "TEXT",
    "refusal": "TEXT",
    "dataset_hash": "TEXT",
}
COLUMNS = (
    "key, image_id, name, state, source, original, accepted_at, crashes, last_failure, refusal, dataset_hash"
)
