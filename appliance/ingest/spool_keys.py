"""Which row of the spool a file is, by its de-duplication key, hashing the dataset only when needed.

A DICOM is keyed by its SOP Instance UID. The first file of a UID is keyed 'sop:<UID>' and its dataset
is not hashed on the way in: the hash of a 15 MB cart image was 3.5 ms of every image's time before the
ward heard (docs/performance.md). Only when the UID comes again are both hashed (BLAKE3 of the dataset)
and compared: the same content is the same image (a duplicate, or a re-send of a quarantined image);
other content under the UID is another image, keyed 'sop:<UID>/blake3:<dataset hash>' (a corrected
re-send is analysed; a forgery that took the UID first hides nothing). The first file's hash is kept in
the row's `dataset_hash` once computed, and computed before its file leaves done/ for good
(`remember_hash`): a re-send after the purge is still recognised. A first file that is gone without a
hash (a quarantined file purged, a file deleted by hand) cannot be compared: a re-send is analysed.

PNG/JPEG and DICOMs without a readable UID are keyed by the sha256 of their bytes, as before.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.ingest.identity import (
    content_key,
    dataset_hash,
    dicom_uid,
    hashed_key,
    is_uid_key,
    legacy_key,
    legacy_key_prefix,
    uid_key,
)
from appliance.ingest.spool_records import STATES

if TYPE_CHECKING:
    from appliance.ingest.spool import Spool

log = logging.getLogger("appliance.ingest.spool")

# (source, state, image_id) of the row a file matched
Row = tuple[str, str, str]


def file_identity(path: Path, kind: str) -> tuple[str | None, str | None]:
    """(uid, None) for a DICOM naming a SOP Instance UID, else (None, 'sha256:<content hash>').
    Read outside the spool's lock: only a repeated UID needs more (`match`, under the lock)."""
    uid = dicom_uid(path) if kind == "dicom" else None
    return (uid, None) if uid is not None else (None, content_key(path))


def match(spool: Spool, path: Path, uid: str | None, key: str | None) -> tuple[str, Row | None]:
    """(the key this file has, the live or retry row that already holds it, or None). Under the lock."""
    db = spool._db
    if uid is None:
        assert key is not None
        return key, _row(spool, key)
    plain = uid_key(uid)
    # Every row of this UID but the retried attempts ('...#<id>'): '#' sorts before '/'.
    rows = db.execute(
        "SELECT key, image_id, name, state, dataset_hash FROM items"
        " WHERE (key = ? OR (key >= ? AND key < ?)) AND instr(key, '#') = 0",
        (plain, plain + "/", plain + "0"),
    ).fetchall()
    if not rows:
        return plain, None
    digest = dataset_hash(path, spool._device)
    hashed = hashed_key(uid, digest)
    for row_key, image_id, name, state, stored in rows:
        if row_key == hashed or (
            row_key == plain and (stored or _hash_of(spool, image_id, name, state)) == digest
        ):
            return row_key, _row(spool, row_key)
    older = legacy_row(db, path, hashed)
    return older if older is not None else (hashed, None)


def remember_hash(spool: Spool, path: Path) -> bool:
    """Before a first file of its UID leaves done/ for good: its dataset hash, kept in its row (hashed
    outside the lock). Returns False: the file may go (`purge_older`'s keep)."""
    image_id = path.name.split(".", 1)[0]
    with spool._lock:
        row = spool._db.execute(
            "SELECT key, dataset_hash FROM items WHERE image_id = ?", (image_id,)
        ).fetchone()
    if row is None or row[1] is not None or not is_uid_key(row[0]):
        return False
    try:
        digest = dataset_hash(path, spool._device)
    except OSError as exc:  # unreadable: a re-send of this UID will be analysed
        log.warning("spool: no dataset hash for %s before it is deleted: %s", image_id, exc)
        return False
    _keep(spool, image_id, digest, durable=True)  # the file is about to go: the hash must stay
    return False


def _keep(spool: Spool, image_id: str, digest: str, *, durable: bool) -> None:
    with spool._tx(durable=durable) as db:
        db.execute("UPDATE items SET dataset_hash = ? WHERE image_id = ?", (digest, image_id))


def _row(spool: Spool, key: str) -> Row | None:
    row = spool._db.execute("SELECT source, state, image_id FROM items WHERE key = ?", (key,)).fetchone()
    return None if row is None else (str(row[0] or ""), str(row[1]), str(row[2]))


def _hash_of(spool: Spool, image_id: str, name: str, state: str) -> str | None:
    """The dataset hash of a first file, from the file where it lies now (then kept in its row); None
    when the file is gone. Its own folder first: the loop may be moving it meanwhile."""
    for folder in sorted(STATES, key=lambda s: s != state):
        with contextlib.suppress(FileNotFoundError):
            digest = dataset_hash(spool.files.dir(folder) / name, spool._device)
            _keep(spool, image_id, digest, durable=False)  # computed again if a power cut loses it
            return digest
    return None


def legacy_row(db: sqlite3.Connection, path: Path, key: str) -> tuple[str, tuple[str, str, str]] | None:
    """(key, row) of a row an older version wrote for this DICOM under its sha256 key: a re-send after an
    upgrade is still a duplicate. Looked for only when such keys exist for its SOP Instance UID (an index
    range), so the sha256 is computed only then."""
    low = legacy_key_prefix(key)
    if low is None:
        return None
    if not db.execute(
        "SELECT 1 FROM items WHERE key >= ? AND key < ? LIMIT 1", (low, low[:-1] + ";")
    ).fetchone():
        return None
    older = legacy_key(path, key)
    row = db.execute("SELECT source, state, image_id FROM items WHERE key = ?", (older,)).fetchone()
    return (older, row) if older is not None and row is not None else None
