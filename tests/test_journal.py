"""The SQLite journal: idempotent results, crash recovery, priors, history, acks, pruning, integrity."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.journal import Journal
from appliance.result import Acknowledgement
from testsupport.results import T0, make_result


def image_state(path: Path, image_id: str) -> str | None:
    """The journal's own record of an image, read as a second process would (there is no API for it)."""
    with closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT state FROM images WHERE image_id = ?", (image_id,)).fetchone()
    return row[0] if row else None


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "journal.sqlite3")


def test_record_result_is_idempotent_per_image(journal: Journal) -> None:
    first = make_result(1)
    assert journal.record_result(first)
    again = first.model_copy(update={"message_id": "another-id", "text": "re-inferred after a crash"})
    assert not journal.record_result(again)
    stored = journal.result_for("img-000001")
    assert stored == first  # the first result counts; the pipeline re-publishes this one
    assert journal.result_for("img-999999") is None
    assert journal.counts()["results"] == 1
    assert image_state(journal.path, "img-000001") == "done"


def test_priors_are_earlier_results_of_the_same_patient_in_acquisition_order(journal: Journal) -> None:
    # Recorded out of order; two patients; one refused image.
    times = {3: T0 + timedelta(hours=5), 1: T0 + timedelta(hours=1), 2: T0 + timedelta(hours=3)}
    for n, at in times.items():
        journal.record_result(make_result(n, patient_key="aaaa", acquired_at=at))
    journal.record_result(make_result(4, patient_key="bbbb", acquired_at=T0 + timedelta(hours=2)))
    refused = make_result(5, patient_key="aaaa", acquired_at=T0 + timedelta(hours=4))
    journal.record_result(refused.model_copy(update={"status": "refused", "reason": "lateral view"}))

    now = T0 + timedelta(hours=6)
    assert [r.image.image_id for r in journal.priors("aaaa", now)] == [
        "img-000001",
        "img-000002",
        "img-000003",
    ]
    assert [r.image.image_id for r in journal.priors("aaaa", now, limit=2)] == ["img-000002", "img-000003"]
    # "before" excludes the current image itself; an offset time is compared as an instant.
    before = (T0 + timedelta(hours=5)).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert [r.image.image_id for r in journal.priors("aaaa", before)] == ["img-000001", "img-000002"]
    assert len(journal.priors("aaaa", now, ok_only=False)) == 4
    assert journal.priors("cccc", now) == []
    with pytest.raises(ValueError, match="ISO 8601"):
        journal.priors("aaaa", "yesterday")


def test_history_newest_first_with_filters_and_acks(journal: Journal) -> None:
    for n in range(5):
        journal.record_result(make_result(n, patient_key="p1" if n % 2 else "p2"))
    rows = journal.history(limit=3)
    assert [r["image_id"] for r in rows] == ["img-000004", "img-000003", "img-000002"]
    assert rows[0]["text"].startswith("Result 4") and rows[0]["acknowledged"] is False
    assert [r["image_id"] for r in journal.history(patient_key="p1")] == ["img-000003", "img-000001"]
    since = (T0 + timedelta(minutes=3)).isoformat()
    assert [r["image_id"] for r in journal.history(since=since)] == ["img-000004", "img-000003"]
    ack = Acknowledgement(message_id=make_result(3).message_id, by="JD", at="2024-03-01T09:00:00Z")
    assert journal.record_ack(ack)
    assert not journal.record_ack(ack)  # a QoS 1 redelivery is stored once
    assert journal.history(patient_key="p1")[0]["acknowledged"] is True
    assert "patient_id" not in rows[0] and "patient_name" not in rows[0]


def test_pruning_by_age_and_by_count(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3", retention_days=30, retention_count=100)
    for n in range(110):
        j.record_result(make_result(n, acquired_at=T0 + timedelta(days=n // 10)))
    ack = Acknowledgement(message_id=make_result(0).message_id, by="JD", at="2024-03-01T09:00:00Z")
    j.record_ack(ack)
    # By count: the 10 oldest go (with their acknowledgement).
    now = (T0 + timedelta(days=12)).timestamp()
    assert j.prune(now) == 10
    assert j.result_for("img-000000") is None and j.result_for("img-000010") is not None
    assert j.acknowledgements(ack.message_id) == []
    # By age: 30 days after day 3, days 0-3 are gone.
    later = (T0 + timedelta(days=33, hours=12)).timestamp()
    assert j.prune(later) == 30
    assert j.counts()["results"] == 70
    assert image_state(j.path, "img-000039") is None and image_state(j.path, "img-000040") == "done"


def test_integrity_check_reports_corruption(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path)
    for n in range(300):
        j.record_result(make_result(n))
    assert j.integrity_check() == []
    j.close()
    # Overwrite part of an index page behind SQLite's back.
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = db.execute("SELECT pageno FROM dbstat WHERE name = 'results_created'").fetchall()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with path.open("r+b") as f:
        f.seek((pages[-1][0] - 1) * page_size + 100)
        f.write(b"\xff" * 200)
    assert Journal(path).integrity_check() != []


def test_timestamps_without_zone_are_utc(journal: Journal) -> None:
    naive = datetime(2024, 3, 1, 8, 0)
    journal.record_result(make_result(1, acquired_at=naive))
    assert [r.image.image_id for r in journal.priors("0123456789abcdef", naive + timedelta(seconds=1))] == [
        "img-000001"
    ]
