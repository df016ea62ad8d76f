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

import pytest

from appliance.pipeline import Analyzer
from appliance.result import Result
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


def test_an_image_result_is_written_only_after_its_acceptance_is_on_disk(
    tmp_path: Path, analyzer: Analyzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop starts on an image before the intake has synced incoming/ (accept(sync=False)); the
    processor's barrier syncs it before anything of the result is written. Real spool, journal, store,
    Analyzer on ONNX Runtime; only the order of the calls is recorded."""
    import appliance.ingest.spool_accept as spool_accept
    from appliance.ingest.spool import Spool
    from appliance.ingest.spool_records import Accepted
    from appliance.journal import Journal
    from appliance.pipeline import Job
    from appliance.processor import ImageProcessor
    from appliance.store import Store

    events: list[str] = []
    real_fsync_dir = spool_accept.fsync_dir

    def synced(path: Path) -> None:
        events.append(f"sync {Path(path).name}")
        real_fsync_dir(path)

    monkeypatch.setattr(spool_accept, "fsync_dir", synced)
    store = Store(tmp_path / "appliance.sqlite3")
    spool, journal = Spool(tmp_path / "spool", store=store), Journal(store)
    real_record = journal.record_result

    def recorded(result: Result) -> bool:
        events.append("journal row")
        return real_record(result)

    monkeypatch.setattr(journal, "record_result", recorded)
    watch = tmp_path / "watch"
    watch.mkdir()
    shutil.copyfile(data.real_dicoms()[0], watch / "a.dcm")
    assert isinstance(spool.accept(watch / "a.dcm", "inbox", sync=False), Accepted)
    item = spool.claim_next()
    assert item is not None and events == []  # claimed and about to be analysed: not synced yet
    finished: list[str] = []
    processor = ImageProcessor(
        store, spool, journal, analyzer, publisher=None, dicom_out=None,
        on_finished=lambda job, result, analysed: finished.append(result.status),
    )  # fmt: skip
    processor.process([Job(path=item.path, image_id=item.image_id, source=item.source)])
    assert finished == ["ok"]
    assert events == ["sync incoming", "sync processing", "journal row"]
    store.close()
