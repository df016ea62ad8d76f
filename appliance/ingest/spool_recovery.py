"""The spool after a crash, and after an upgrade: folders made to agree with the rows, rows adopted.

The items table is the truth (appliance/ingest/spool.py). A kill -9 can leave: a file in processing/
(handed back to incoming/ and counted against the image: it may be what killed the process); a file
still in processing/ or incoming/ whose row already says done or quarantine (the move after the commit
was cut short: finished now, the reason file written from the row); a file renamed into the spool whose
row was never committed (registered, its key computed again from its content). A power cut can also
leave the row of an acceptance without its file (the rename into incoming/ is not synced when accepted:
appliance/ingest/spool_accept.py): the row is forgotten, and the file, back in the folder it came from,
is taken again under the same key when it is offered again. An older version kept
the rows in spool/spool.db and a meta/<id>.json per image: the rows are adopted into the store, the
meta files deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.clock import now_iso
from appliance.errors import InputRejected
from appliance.ingest import sniff
from appliance.ingest.identity import content_sha256, image_id_for
from appliance.ingest.spool_records import COLUMNS, RETRY_STATES

if TYPE_CHECKING:
    from appliance.ingest.spool import Spool

log = logging.getLogger("appliance.ingest.spool")


def recover(spool: Spool) -> int:
    """After a crash: make the folders agree with the rows again. Files in processing/ go back to
    incoming/ (counted against the image: it may be what killed the process); a move to done/ or
    quarantine/ that a crash cut short is finished; files whose row was never committed are
    registered. Returns how many images were put back into incoming/."""
    back: list[str] = []
    with spool._lock:
        # First: what this recovery commits must not reach the disk before the renames it is about.
        spool.files.sync_live()
        spool.files.clear_tmp()
        for state in ("incoming", "processing", "done", "quarantine"):
            for file in sorted(spool.files.dir(state).iterdir()):
                image_id = file.name.split(".", 1)[0]
                row = spool._row(image_id)
                if state == "quarantine" and (row is None or file.name.endswith(".reason.txt")):
                    continue  # reason files and files refused before they had an id
                if row is None:
                    _register_orphan(spool, file, image_id, "incoming" if state == "processing" else state)
                    row = spool._row(image_id)
                    assert row is not None
                if row[1] in ("done", "quarantine") and state != row[1]:
                    _finish_move(spool, image_id, row[1])
                elif state == "processing":
                    os.rename(file, spool.files.dir("incoming") / file.name)
                    with spool._tx() as db:
                        db.execute(
                            "UPDATE items SET state = 'incoming', crashes = crashes + 1 WHERE image_id = ?",
                            (image_id,),
                        )
                    back.append(image_id)
                elif row[1] != state:  # rows of an older version, whose folders were the truth
                    spool._set_state(image_id, state)
        _forget_unplaced(spool)
        spool.files.sync_live()  # the moves back to incoming/ above
        _forget_sidecars(spool)
    if back:
        log.warning("spool recovery: %d image(s) back from processing/ to incoming/", len(back))
    return len(back)


def _forget_unplaced(spool: Spool) -> None:
    """Rows of accepted images whose file is in no folder of the spool: forgotten, so that the file is
    taken again under the same key, image id and message id when it is offered again (unless another
    file took its UID meanwhile: then a hashed key and a new id, for an image never reported).

    A rename into incoming/ is not synced when accepted (spool_accept.py), while its row may reach the
    disk with another commit; after a power cut the file is back where it came from (the watched folder,
    the DICOM receiver's). Kept, the row would make it a duplicate of itself (a content key: the source
    deleted) or another image (a UID key: hashed, a new id). Checked in a write transaction: a USB import
    in its own process places its file before its row commits."""
    with spool._tx() as db:
        rows = db.execute(
            "SELECT image_id, name, key FROM items WHERE state IN ('incoming', 'processing')"
        ).fetchall()
        gone = [
            (image_id, key)
            for image_id, name, key in rows
            if not any((spool.files.dir(state) / name).exists() for state in ("incoming", "processing"))
        ]
        for image_id, key in gone:
            db.execute("DELETE FROM items WHERE image_id = ?", (image_id,))
            _give_key_back(spool, db, key, image_id)
    if gone:
        log.warning(
            "spool recovery: %d accepted image(s) not in the spool (a power cut before the move reached"
            " the disk, or removed by hand); taken again when offered again",
            len(gone),
        )


def _give_key_back(spool: Spool, db: sqlite3.Connection, key: str, image_id: str) -> None:
    """A re-send of a quarantined image moved that row's key aside (`<key>#<its id>`, spool_accept.py) and
    took the id made from it: the row it displaced gets the key back, so the file offered again is that
    re-send again, under the same id. Only that row: earlier re-sends keep theirs."""
    for (older,) in db.execute(
        "SELECT image_id FROM items WHERE key = ? || '#' || image_id", (key,)
    ).fetchall():
        if image_id_for(f"{key}#{older}", spool._id_secret) == image_id:
            db.execute("UPDATE items SET key = ? WHERE image_id = ?", (key, older))
            return


def _finish_move(spool: Spool, image_id: str, state: str) -> None:
    """The row says done/quarantine but the process died before the file followed it."""
    name, _, source, original = spool._row(image_id) or ("", "", "", "")
    if state == "done":
        spool.files.file_done(name)
        return
    row = spool._db.execute("SELECT refusal FROM items WHERE image_id = ?", (image_id,)).fetchone()
    spool.files.file_refused(name, row[0] or "refused\n(reason not recorded)", original or name, source)


def adopt(spool: Spool, legacy: Path) -> int:
    """The rows of the spool.db an older version kept in the spool folder, moved into the store."""

    def copy(db: sqlite3.Connection) -> int:
        have = {row[1] for row in db.execute("PRAGMA legacy.table_info(items)")}
        if not have:
            return 0
        columns = [c.strip() for c in COLUMNS.split(",")]
        picked = ", ".join(c if c in have else ("0" if c == "crashes" else "NULL") for c in columns)
        return int(
            db.execute(
                f"INSERT OR IGNORE INTO items ({COLUMNS}) SELECT {picked} FROM legacy.items ORDER BY seq"
            ).rowcount
        )

    return spool.store.adopt(legacy, copy)


def _forget_sidecars(spool: Spool) -> None:
    """An older version kept a meta/<id>.json per image (never deleted): the rows hold all of it."""
    meta = spool.root / "meta"
    if meta.is_dir():
        for leftover in meta.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        with contextlib.suppress(OSError):
            meta.rmdir()


def _register_orphan(spool: Spool, file: Path, image_id: str, state: str) -> None:
    """A file renamed into the spool just before a crash, before its row was written: its key is
    computed again from its content (where it came from is not known any more)."""
    from appliance.ingest.spool_keys import FileIdentity, orphan_key  # it uses the spool's rows too

    try:
        key = orphan_key(spool, FileIdentity.of(file, sniff(file), spool._device), image_id)
    except InputRejected:  # not an image after all: it is still the spool's to account for
        key = f"sha256:{content_sha256(file)}"
    with spool._tx() as db:
        # A retry whose row was never written: the failed attempt's row still holds the key.
        db.execute(
            "UPDATE items SET key = key || '#' || image_id WHERE key = ? AND image_id != ?"
            f" AND state IN {RETRY_STATES}",
            (key, image_id),
        )
        db.execute(
            "INSERT OR IGNORE INTO items (key, image_id, name, state, source, original, accepted_at)"
            " VALUES (?, ?, ?, ?, '', NULL, ?)",
            (key, image_id, file.name, state, now_iso()),
        )
