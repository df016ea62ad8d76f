"""The processor's end of an image: journal row, outbox messages and spool state are one transaction.

A real daemon, broker and database: the outbox is made to refuse writes with a SQLite trigger (a real
database error, as a failing disk gives), so the image's hand-off fails after its journal row was
written in the same transaction; nothing of it may stay, and the image must be analysed once the
database takes writes again.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from testsupport import data
from testsupport.daemon import DaemonProcess, wait_results, wait_until
from testsupport.mosquitto import Broker, Subscriber


def query(path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        return db.execute(sql).fetchall()


def execute(path: Path, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        db.execute(sql)
        db.commit()


def test_a_failed_hand_off_leaves_no_journal_row_and_the_image_is_read_again(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    daemon = daemons(broker, model)
    store = daemon.workdir / "journal.sqlite3"
    image = data.real_dicoms()[0]
    with Subscriber(broker, "cxr/+/+/result") as sub:
        daemon.start()
        execute(
            store,
            "CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox"
            " BEGIN SELECT RAISE(ABORT, 'outbox refuses writes (test)'); END",
        )
        shutil.copyfile(image, daemon.inbox / "a.dcm")
        assert wait_until(lambda: "outbox refuses writes" in daemon.log(), 60), daemon.log()[-3000:]
        # The journal row was written in the transaction the outbox failed: rolled back with it.
        assert query(store, "SELECT count(*) FROM results") == [(0,)]
        assert query(store, "SELECT state FROM items") in ([("incoming",)], [("processing",)])
        assert not daemon.spool_files("done")

        execute(store, "DROP TRIGGER refuse_outbox")
        results = wait_results(sub, 1, 60)
        assert len(results) == 1 and results[0]["status"] == "ok", daemon.log()[-3000:]
        assert wait_until(lambda: len(daemon.spool_files("done")) == 1, 20)
        assert query(store, "SELECT count(*) FROM results") == [(1,)]
        assert query(store, "SELECT state, crashes FROM items") == [("done", 0)]  # not the image's fault
    daemon.stop()
