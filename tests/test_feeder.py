"""The feeder: batches in arrival order, the next one claimed and read while this one is analysed; an image
that failed before alone and unread; what was read ahead handed back on release, uncounted."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from appliance.feeder import Feeder
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted, SpoolItem
from appliance.pipeline import Analyzer
from testsupport.data import cxr_data


def backlog(spool: Spool, tmp_path: Path, count: int) -> list[str]:
    """`count` real images accepted into the spool; their ids in arrival order."""
    watch = tmp_path / "watch"
    watch.mkdir()
    ids = []
    for index, image in enumerate(sorted((cxr_data() / "images" / "cohen").glob("*.jpg"))[:count]):
        got = spool.accept(shutil.copyfile(image, watch / f"{index}.jpg"), "watch")
        assert isinstance(got, Accepted)
        ids.append(got.image_id)
    return ids


def in_processing(spool: Spool) -> int:
    return len(list((spool.root / "processing").iterdir()))


def test_batches_come_in_arrival_order_with_the_next_one_read_ahead(
    spool: Spool, analyzer: Analyzer, tmp_path: Path
) -> None:
    ids = backlog(spool, tmp_path, 5)
    feeder = Feeder(spool, batch=2)
    first = feeder.take(analyzer)
    assert [j.image_id for j in first] == ids[:2] and all(j.image is not None for j in first)
    assert in_processing(spool) == 4  # this batch and the one read ahead
    for job in first:
        spool.mark_done(job.image_id)
    second = feeder.take(analyzer)
    assert [j.image_id for j in second] == ids[2:4] and all(j.tensor is not None for j in second)
    for job in second:
        spool.mark_done(job.image_id)
    third = feeder.take(analyzer)
    assert [j.image_id for j in third] == ids[4:]
    spool.mark_done(ids[4])
    assert feeder.take(analyzer) == [] and spool.pending_count() == 0


def test_an_image_that_failed_before_comes_alone_and_unread(
    spool: Spool, analyzer: Analyzer, tmp_path: Path
) -> None:
    ids = backlog(spool, tmp_path, 4)
    claimed = spool.claim(1)
    spool.record_failure(claimed[0].image_id, "analysis: RuntimeError: test")  # back in incoming, counted
    feeder = Feeder(spool, batch=2)
    suspect = feeder.take(analyzer)
    assert [j.image_id for j in suspect] == [ids[0]] and suspect[0].image is None  # the processor reads it
    assert in_processing(spool) == 1  # nothing read beside it
    spool.mark_done(ids[0])
    rest = feeder.take(analyzer)
    assert [j.image_id for j in rest] == ids[1:3]


def test_release_hands_the_batch_read_ahead_back_uncounted(
    spool: Spool, analyzer: Analyzer, tmp_path: Path
) -> None:
    ids = backlog(spool, tmp_path, 4)
    feeder = Feeder(spool, batch=2)
    current = feeder.take(analyzer)
    feeder.release()
    for job in current:
        spool.release(job.image_id)
    assert in_processing(spool) == 0 and spool.pending_count() == 4
    assert all(spool.crashes(i) == 0 for i in ids)
    assert [j.image_id for j in feeder.take(analyzer)] == ids[:2]


def test_a_failing_claim_of_the_next_batch_leaves_this_one_going_and_the_rest_waiting(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = backlog(spool, tmp_path, 4)
    feeder = Feeder(spool, batch=2)
    claim = spool.claim
    calls = []

    def full_on_the_second(n: int = 1) -> list[SpoolItem]:
        calls.append(n)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return claim(n)

    monkeypatch.setattr(spool, "claim", full_on_the_second)
    current = feeder.take(analyzer)
    assert [j.image_id for j in current] == ids[:2] and all(j.image is not None for j in current)
    assert in_processing(spool) == 2 and spool.pending_count() == 4  # nothing else handed out
    for job in current:
        spool.mark_done(job.image_id)
    assert [j.image_id for j in feeder.take(analyzer)] == ids[2:]
    assert all(spool.crashes(i) == 0 for i in ids)


def test_a_claim_that_fails_after_claiming_hands_its_images_back_uncounted(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handing the others back beside a suspect can fail (a full disk): every image of that claim goes
    back to incoming/ as far as possible, none stays in processing/ to be counted as a crash later."""
    ids = backlog(spool, tmp_path, 3)
    claimed = spool.claim(1)
    spool.record_failure(claimed[0].image_id, "analysis: RuntimeError: test")  # a suspect, first in line
    release = spool.release
    failing = [sqlite3.OperationalError("database or disk is full")]

    def release_failing_once(image_id: str) -> object:
        if failing:
            raise failing.pop()
        return release(image_id)

    monkeypatch.setattr(spool, "release", release_failing_once)
    with pytest.raises(sqlite3.OperationalError):
        Feeder(spool, batch=2).take(analyzer)
    assert not failing and in_processing(spool) == 0 and spool.pending_count() == 3
    assert [spool.crashes(i) for i in ids] == [1, 0, 0]  # the suspect's own failure, nothing more
    assert [j.image_id for j in Feeder(spool, batch=2).take(analyzer)] == [ids[0]]


def test_the_claimed_files_folders_are_synced_while_they_are_read(
    spool: Spool, analyzer: Analyzer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files renamed into the spool are not synced when accepted; the loop syncs their folders after the
    claim, while the read-ahead thread reads, so the transaction that ends their images has nothing left."""
    import appliance.ingest.spool_files as spool_files

    synced: list[str] = []
    monkeypatch.setattr(spool_files, "fsync_dir", lambda path: synced.append(path.name))
    ids = backlog(spool, tmp_path, 2)
    assert synced == []
    feeder = Feeder(spool, batch=2)
    jobs = feeder.take(analyzer)
    assert synced == ["incoming", "processing"] and all(job.image is not None for job in jobs)
    with spool.store.transaction(wake_first=True):
        for image_id in ids:
            spool.mark_done(image_id)
    assert synced == ["incoming", "processing"] and spool.pending_count() == 0
