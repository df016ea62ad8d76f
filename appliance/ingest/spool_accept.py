"""Taking a file into the spool: its key decided, the file placed in incoming/ and its row written, in one
write transaction.

One transaction from the key to the row (BEGIN IMMEDIATE, SQLite's write lock): another process taking
files into the same spool (a USB import) waits, so two files of one new UID can never both be given the
UID's key and the same name. The file first, then its row: a kill -9 between the two leaves a file that
recover() registers, never a row without a file (a power cut can: see below).

When the file is kept. A copy (read-only media, another filesystem) is synced into incoming/ before the
transaction ends: its original may go, or the stick be pulled, at once. A file renamed within the
spool's filesystem is not synced here (0.7 ms on the ward's path): a rename is atomic, so after a power
cut the file is either back where it came from (the watched folder or the DICOM receiver's, both offered
again at start) or in incoming/ (registered by recover(), which syncs the folders), and either way it
gets the same key, so the same image id and message id. The loop syncs the folders after each claim,
while the read-ahead thread reads (appliance/feeder.py), and the transaction that ends an image (done,
quarantine) syncs whatever is left before it commits (`Spool.settle_placements`, by way of
`Store.before_durable`), so a file does not fall back to the watched folder behind a row saying its image
was read. The acceptance's own row may reach the disk before the rename (another commit carries it):
recover() forgets a row whose file is in no folder of the spool, so the file, offered again, is taken
under the same key (unless another file took its UID meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.clock import now_iso
from appliance.durable import fsync_dir
from appliance.ingest.identity import image_id_for
from appliance.ingest.spool_keys import FileIdentity, Row, match
from appliance.ingest.spool_records import EXTENSIONS, RETRY_STATES, Accepted, Duplicate

if TYPE_CHECKING:
    from appliance.ingest.spool import Spool

log = logging.getLogger("appliance.ingest.spool")


def admit(
    spool: Spool,
    path: Path,
    source: str,
    kind: str,
    file: FileIdentity,
    *,
    move: bool,
    staged: Path | None,
) -> Accepted | Duplicate:
    """`staged`: a durable copy already made under tmp/ (read-only media, another filesystem): copied
    before the transaction, which must not hold the write lock for a 500 MB copy."""
    placed: tuple[Path, bool] | None = None  # (where, renamed from the source)
    duplicate: tuple[str, Row] | None = None
    try:
        # Not waited for on disk: the file placed in incoming/ is what makes the image accepted. A row
        # lost in a power cut is rebuilt by recover() from that file, and the processor's durable commit
        # carries this one with it.
        with spool._tx(durable=False) as db:
            key, row = match(spool, file)
            image_id = image_id_for(key, spool._id_secret)
            retried = None
            if row is not None and row[1] in RETRY_STATES:
                # Sent again after it was quarantined (or vanished): analysed again, under a new id (the
                # journal keeps the first result per id). The old row keeps its file in quarantine/.
                retried, image_id = row[2], image_id_for(f"{key}#{row[2]}", spool._id_secret)
                row = None
            if row is not None:
                duplicate = (key, row)  # the source is removed once this transaction committed
            else:
                name = f"{image_id}.{EXTENSIONS[kind]}"
                placed = _place(spool, path, staged, spool.files.dir("incoming") / name, move=move)
                if placed[1]:
                    spool.placed_unsynced()  # renamed: see the module's docstring
                else:
                    fsync_dir(placed[0].parent)  # a copy: durable before its original may go
                if retried is not None:  # the key is unique: the old row's is kept, made its own
                    db.execute("UPDATE items SET key = key || '#' || image_id WHERE image_id = ?", (retried,))
                db.execute(
                    "INSERT INTO items (key, image_id, name, state, source, original, accepted_at)"
                    " VALUES (?, ?, ?, 'incoming', ?, ?, ?)",
                    (key, image_id, name, source, str(path), now_iso()),
                )
    except BaseException:
        # Undo, so the source is offered again (nothing half-accepted): a full disk, a failed write.
        if placed is not None:
            _undo(spool, path, *placed)
        raise
    if duplicate is not None:
        return _duplicate(path, source, *duplicate, move=move)
    assert placed is not None
    if move and not placed[1]:
        # Copied from another filesystem: the spool copy is durable, now the original may go.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    # The original path may name the patient: at debug level only (the row keeps it for a while).
    log.info("accepted an image from %s as %s", source, image_id)
    log.debug("%s is %s", path, image_id)
    return Accepted(image_id, placed[0], key)


def _place(spool: Spool, path: Path, staged: Path | None, dest: Path, *, move: bool) -> tuple[Path, bool]:
    """(dest, renamed from the source): the staged copy or the source itself put at dest, not synced."""
    if staged is not None:
        os.rename(staged, dest)
        return dest, False
    return dest, spool.files.place(path, dest, move=move)


def _duplicate(path: Path, source: str, key: str, row: Row, *, move: bool) -> Duplicate:
    removed = False
    if move:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed = True
    log.info(
        "duplicate of %s from %s, first seen from %s; %s",
        row[2],
        source,
        row[0],
        "removed" if removed else "left in place",
    )
    log.debug("%s (%s) is a duplicate of %s", path, key, row[2])
    return Duplicate(row[2], key, row[0], removed)


def _undo(spool: Spool, source: Path, dest: Path, renamed: bool) -> None:
    with contextlib.suppress(OSError):
        if renamed:
            os.rename(dest, source)
        else:
            dest.unlink()
