"""Retention of everything that holds patient data, through the real daemon's housekeeping (it runs
as the loop starts): quarantine/, the spool's records of where files came from, and dicom-out/."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted
from testsupport import data
from testsupport.daemon import DaemonProcess, wait_until

DAY = 86400.0


def aged(path: Path, days: float, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(content)
    then = time.time() - days * DAY
    os.utime(path, (then, then))
    return path


def test_housekeeping_purges_quarantine_records_and_dicom_out_but_keeps_what_the_pacs_awaits(
    model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    outbox = tmp_path / "dicom-out"
    daemon = daemons(
        None,
        model,
        ingest={"keep_quarantine_days": 30, "keep_records_days": 0},
        dicom_out={"enabled": True, "outbox": str(outbox), "keep_days": 30, "keep_unsent_days": 90},
    )
    # A finished image whose record still says where it came from (a stick path naming the patient).
    stick = tmp_path / "DOE_JANE_1962-03-04_MRN123456"
    stick.mkdir()
    (stick / "IMG0002.dcm").write_bytes(data.real_dicoms()[0].read_bytes())
    spool = Spool(daemon.spool)
    accepted = spool.accept(stick / "IMG0002.dcm", "usb:sdb1", move=False)
    item = spool.claim_next()
    assert item is not None and spool.mark_done(item.image_id)
    spool.close()
    assert isinstance(accepted, Accepted)
    store = daemon.workdir / "journal.sqlite3"  # the appliance's database: the spool's rows move there

    def originals(path: Path) -> list[str | None]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return [row[0] for row in db.execute("SELECT original FROM items")]

    assert "DOE_JANE" in str(originals(daemon.spool / "spool.db"))

    old_refused = aged(daemon.spool / "quarantine" / "20240101T000000Z-x.dcm", 31)
    old_reason = aged(daemon.spool / "quarantine" / "20240101T000000Z-x.dcm.reason.txt", 31)
    new_refused = aged(daemon.spool / "quarantine" / "20250101T000000Z-y.dcm", 29)
    written_old = aged(outbox / "a.sr.dcm", 31)
    written_new = aged(outbox / "b.sr.dcm", 29)
    queued = aged(outbox / "c.sr.dcm", 31)
    (outbox / "queue").mkdir()
    os.link(queued, outbox / "queue" / "c.sr.dcm")  # as the writer queues it: a second name
    forgotten = aged(outbox / "queue" / "d.sr.dcm", 91)

    daemon.start()
    assert wait_until(lambda: not old_refused.exists(), 20), daemon.log()
    assert wait_until(lambda: store.exists() and originals(store) == [None], 20), daemon.log()
    daemon.stop()

    assert not old_reason.exists() and new_refused.exists()
    with contextlib.closing(sqlite3.connect(store)) as db:
        rows = db.execute("SELECT original, key FROM items").fetchall()
    assert rows and all(original is None and key for original, key in rows)
    assert b"DOE_JANE" not in store.read_bytes() and not (daemon.spool / "spool.db").exists()
    assert not written_old.exists() and written_new.exists()
    assert queued.exists() and (outbox / "queue" / "c.sr.dcm").exists()  # the PACS has not had it yet
    assert not forgotten.exists()
    assert "deleted unsent after 90 days" in daemon.log()
