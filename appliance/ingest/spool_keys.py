"""Which row of the spool a file is, by its de-duplication key, hashing the dataset only when needed.

A DICOM is keyed by its SOP Instance UID. The first file of a UID is keyed 'sop:<UID>' and its dataset
is not hashed on the way in: the hash of a 15 MB cart image was 3.5 ms of every image's time before the
ward heard (docs/performance.md). Only when the UID comes again are both hashed (BLAKE3 of the dataset)
and compared: the same content is the same image (a duplicate, or a re-send of a quarantined image);
other content under the UID is another image, keyed 'sop:<UID>/blake3:<dataset hash>' (a corrected
re-send is analysed; a forgery that took the UID first hides nothing). The first file's hash is kept in
the row's `dataset_hash` once computed, and computed before its file leaves done/ for good
(`remember_hashes`): a re-send after the purge is still recognised. A first file that is gone without a
hash (a quarantined file purged, a file deleted by hand) cannot be compared: a re-send is analysed.

A "UID" that is not one (letters, '#', '/': any sender can write anything there) is always hashed, as
before: the key's separators must not be forgeable. PNG/JPEG and DICOMs without a readable UID are keyed
by the sha256 of their bytes, as before.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.ingest.identity import (
    content_key,
    dataset_hash,
    dicom_uid,
    hashed_key,
    image_id_for,
    is_uid_key,
    legacy_key,
    legacy_key_prefix,
    uid_key,
)
from appliance.ingest.spool_records import RETRY_STATES, SPOOL_ERRORS, STATES
from appliance.ingest.uid_scan import valid_uid

if TYPE_CHECKING:
    from appliance.ingest.spool import Spool

log = logging.getLogger("appliance.ingest.spool")

# (source, state, image_id) of the row a file matched
Row = tuple[str, str, str]
# Hashing first files before retention deletes them, per housekeeping pass: the loop's pass must stay
# short (the rest waits for the next pass, ~10 minutes later, still hashed before they go).
PURGE_HASH_BUDGET_S = 0.25
# A file being moved between two folders (processing/ -> done/ after its commit) is looked for again.
_LOOKS = 2


@dataclass
class FileIdentity:
    """What the spool needs to know which row a file is: its UID, or its content key; the dataset hash
    computed at most once, and only when asked for (`digest`)."""

    path: Path
    uid: str | None  # a valid SOP Instance UID
    key: str | None  # otherwise the key, computed from the content
    device: int | None = None  # see identity.dataset_blake3
    _digest: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, path: Path, kind: str, device: int | None = None) -> FileIdentity:
        """Read outside the spool's lock (a header parse); the hash waits for `match`, when needed."""
        uid = dicom_uid(path) if kind == "dicom" else None
        if uid is None:
            return cls(path, None, content_key(path), device)
        if not valid_uid(uid):
            return cls(path, None, hashed_key(uid, dataset_hash(path, device)), device)
        return cls(path, uid, None, device)

    def digest(self) -> str:
        if self._digest is None:
            self._digest = dataset_hash(self.path, self.device)
        return self._digest


def match(spool: Spool, file: FileIdentity) -> tuple[str, Row | None]:
    """(the key this file has, the live or retry row that already holds it, or None). Call inside the
    spool's write transaction: the key decided and the row written under one lock, for every process."""
    db = spool._db
    if file.uid is None:
        assert file.key is not None
        return file.key, _row(db, file.key)
    plain = uid_key(file.uid)
    # Every row of this UID but the retried attempts ('...#<id>'): '#' sorts before '/'.
    rows = db.execute(
        "SELECT key, image_id, name, state, dataset_hash FROM items"
        " WHERE (key = ? OR (key >= ? AND key < ?)) AND instr(key, '#') = 0",
        (plain, plain + "/", plain + "0"),
    ).fetchall()
    if not rows:
        return plain, None
    hashed = hashed_key(file.uid, file.digest())
    for row_key, image_id, name, state, stored in rows:
        if row_key == hashed or (
            row_key == plain and (stored or _hash_of(spool, image_id, name, state)) == file.digest()
        ):
            return row_key, _row(db, row_key)
    older = legacy_row(db, file.path, hashed)
    return older if older is not None else (hashed, None)


def orphan_key(spool: Spool, file: FileIdentity, image_id: str) -> str:
    """The key of a file renamed into the spool whose row was lost: the one its id was made from (the
    first of its UID or not, whatever order recovery finds the files in), else as admission would."""
    if file.uid is not None:
        for candidate in (uid_key(file.uid), hashed_key(file.uid, file.digest())):
            if image_id_for(candidate, spool._id_secret) == image_id:
                return candidate
    key, row = match(spool, file)
    # Held by another live image (the same content accepted twice): this file is still accounted for. A
    # retry state's row gives its key up (recover renames it), as admission does.
    held = row is not None and row[2] != image_id and row[1] not in RETRY_STATES
    return f"{key}#{image_id}" if held else key


def remember_hashes(spool: Spool) -> Callable[[Path], bool]:
    """purge_older's `keep` for done/: a first file of its UID has its dataset hash kept in its row
    before it goes (a re-send months later is still a duplicate); a file not hashed within this pass's
    budget is kept for the next pass."""
    deadline = time.monotonic() + PURGE_HASH_BUDGET_S

    def keep(path: Path) -> bool:
        image_id = path.name.split(".", 1)[0]
        with spool._lock:
            row = spool._db.execute(
                "SELECT key, dataset_hash FROM items WHERE image_id = ?", (image_id,)
            ).fetchone()
        if row is None or row[1] is not None or not is_uid_key(row[0]):
            return False
        if time.monotonic() > deadline:
            return True
        try:
            digest = dataset_hash(path, spool._device)
            _keep(spool, image_id, digest, durable=True)  # the file is about to go: the hash must stay
        except (*SPOOL_ERRORS, ValueError) as exc:  # a re-send of this UID will be analysed
            log.warning("spool: no dataset hash kept for %s before it is deleted: %s", image_id, exc)
        return False

    return keep


def _keep(spool: Spool, image_id: str, digest: str, *, durable: bool) -> None:
    with spool._tx(durable=durable) as db:
        db.execute("UPDATE items SET dataset_hash = ? WHERE image_id = ?", (digest, image_id))


def _row(db: sqlite3.Connection, key: str) -> Row | None:
    row = db.execute("SELECT source, state, image_id FROM items WHERE key = ?", (key,)).fetchone()
    return None if row is None else (str(row[0] or ""), str(row[1]), str(row[2]))


def _hash_of(spool: Spool, image_id: str, name: str, state: str) -> str | None:
    """The dataset hash of a first file, from the file where it lies now (then kept in its row); None
    when it is gone or cannot be read (the file compared with it is then analysed: the safe side). Its
    own folder first, and every folder twice: the loop may be moving it meanwhile."""
    folders = sorted(STATES, key=lambda s: s != state) * _LOOKS
    for folder in folders:
        try:
            digest = dataset_hash(spool.files.dir(folder) / name, spool._device)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("spool: cannot hash %s to compare a re-send of its UID: %s", image_id, exc)
            return None
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
