"""Recovery when a kill -9 fell between a commit and the file move that follows it: the row is the truth.

The processor commits an image's end (journal row, outbox messages, spool state) and only then moves the
file; these tests leave the file where a crash at that moment would (the row says done/quarantine, the
file is still in processing/) and check that recover() finishes the move without counting a failure, and
writes the reason file of a refused image from its row.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted, Duplicate, Rejected
from appliance.store import Store
from tests.ingest.conftest import NATIVE_DX, copy_to, real
from testsupport.data import cxr_data


def real_image() -> Path:
    return sorted((cxr_data() / "images" / "cohen").glob("*.jpg"))[0]


def accepted(tmp_path: Path) -> tuple[Store, Spool, Accepted]:
    """A spool on the appliance's store with one real image accepted (in incoming/)."""
    watch = tmp_path / "watch"
    watch.mkdir()
    store = Store(tmp_path / "appliance.sqlite3")
    spool = Spool(tmp_path / "spool", store=store)
    got = spool.accept(Path(shutil.copyfile(real_image(), watch / "a.jpg")), "watch")
    assert isinstance(got, Accepted) and got.path.parent.name == "incoming"
    return store, spool, got


def claimed(tmp_path: Path) -> tuple[Store, str, str]:
    """A spool on the appliance's store with one image claimed (in processing/): its id and file name."""
    store, spool, got = accepted(tmp_path)
    item = spool.claim_next()
    assert item is not None and item.path.parent.name == "processing"
    return store, got.image_id, item.path.name


def committed_without_the_move(store: Store, image_id: str, state: str, refusal: str | None = None) -> None:
    """The row as the committed transaction left it; the move after the commit never ran (killed)."""
    path = store.path
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE items SET state = ?, refusal = ? WHERE image_id = ?", (state, refusal, image_id))
        db.commit()


def test_a_done_image_left_in_processing_is_moved_to_done_uncounted(tmp_path: Path) -> None:
    store, image_id, name = claimed(tmp_path)
    committed_without_the_move(store, image_id, "done")
    after = Spool(tmp_path / "spool", store=Store(tmp_path / "appliance.sqlite3"))
    assert after.recover() == 0  # nothing handed back: its result was committed
    assert (tmp_path / "spool" / "done" / name).is_file()
    assert not (tmp_path / "spool" / "processing" / name).exists()
    assert after.crashes(image_id) == 0 and after.pending_count() == 0
    after.store.close()


def test_a_refused_image_left_in_processing_gets_its_file_and_reason_from_the_row(tmp_path: Path) -> None:
    store, image_id, name = claimed(tmp_path)
    committed_without_the_move(store, image_id, "quarantine", "internal error\nfailed 3 times; last: boom")
    after = Spool(tmp_path / "spool", store=Store(tmp_path / "appliance.sqlite3"))
    assert after.recover() == 0
    quarantine = tmp_path / "spool" / "quarantine"
    assert (quarantine / name).is_file()
    reason = (quarantine / f"{name}.reason.txt").read_text()
    assert "reason: internal error" in reason and "detail: failed 3 times; last: boom" in reason
    assert "source: watch" in reason and after.crashes(image_id) == 0
    after.store.close()


def test_an_image_in_processing_whose_end_was_not_committed_is_read_again_and_counted(tmp_path: Path) -> None:
    store, image_id, name = claimed(tmp_path)
    store.close()  # killed while analysing: nothing committed after the claim
    after = Spool(tmp_path / "spool", store=Store(tmp_path / "appliance.sqlite3"))
    assert after.recover() == 1
    assert (tmp_path / "spool" / "incoming" / name).is_file() and after.crashes(image_id) == 1
    item = after.claim_next()
    assert item is not None and item.image_id == image_id
    after.store.close()


def test_an_accepted_image_whose_row_a_power_cut_lost_is_registered_again_and_read_once(
    tmp_path: Path,
) -> None:
    """The acceptance row is committed without waiting for the disk: after a power cut only the file in
    incoming/ may be left. Recovery registers it under the same id; the same file offered again is a
    duplicate of it, and it is claimed exactly once."""
    store, _, got = accepted(tmp_path)
    path = store.path
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM items WHERE image_id = ?", (got.image_id,))
        db.commit()
    spool = Spool(tmp_path / "spool", store=Store(path))
    assert spool.recover() == 0  # nothing was in processing/
    again = spool.accept(Path(shutil.copyfile(real_image(), tmp_path / "watch" / "b.jpg")), "watch")
    assert isinstance(again, Duplicate) and again.image_id == got.image_id
    item = spool.claim_next()
    assert item is not None and item.image_id == got.image_id
    spool.mark_done(item.image_id)
    assert spool.claim_next() is None


def offered_again_after_a_lost_rename(
    spool: Spool, placed: Path, source: Path
) -> tuple[Spool, Accepted | Duplicate | Rejected]:
    """The disk as a power cut left it (the rename into the spool undone, the rows kept), the spool
    started again, and the file offered again from where it came back."""
    os.rename(placed, source)
    spool.close()
    spool = Spool(spool.root)
    spool.recover()
    return spool, spool.accept(source, "watch")


@pytest.mark.parametrize("state", ["incoming", "processing"])
@pytest.mark.parametrize("image", [NATIVE_DX, "jpeg"], ids=["uid key", "content key"])
def test_a_rename_lost_in_a_power_cut_behind_its_row_takes_the_file_again_under_the_same_id(
    tmp_path: Path, state: str, image: str
) -> None:
    """The row of an accepted image reached the disk (with another commit) but its unsynced rename did
    not: the file is back in the watched folder. Offered again after recovery it is taken again, under
    the same id (so the same message id): not deleted as a duplicate of itself, nor a new image."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    source = copy_to(real(NATIVE_DX) if image == NATIVE_DX else real_image(), watch, "a")
    content = source.read_bytes()
    first = spool.accept(source, "watch")
    assert isinstance(first, Accepted)
    if state == "processing":
        spool.claim()
    spool, again = offered_again_after_a_lost_rename(spool, spool.root / state / first.path.name, source)
    assert isinstance(again, Accepted) and again.image_id == first.image_id
    assert again.path.read_bytes() == content and spool.pending_count() == 1
    spool.close()


@pytest.mark.parametrize("quarantined", [1, 2])
def test_a_lost_rename_of_a_resend_after_quarantine_keeps_its_retry_id(
    tmp_path: Path, quarantined: int
) -> None:
    """Quarantined (once or twice, re-sent in between), re-sent, and that last rename lost behind its row:
    the row it displaced gets the key back, and only that one (giving it to every earlier re-send broke
    the key's uniqueness, and recovery with it at every start); offered again, the same retry id."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    ids = []
    for attempt in range(quarantined):
        got = spool.accept(copy_to(real(NATIVE_DX), watch, f"{attempt}.dcm"), "watch")
        assert isinstance(got, Accepted)
        spool.quarantine(got.image_id, "decode failed", "test")
        ids.append(got.image_id)
    source = copy_to(real(NATIVE_DX), watch, "last.dcm")
    last = spool.accept(source, "watch")
    assert isinstance(last, Accepted) and last.image_id not in ids
    spool, again = offered_again_after_a_lost_rename(spool, last.path, source)
    assert isinstance(again, Accepted) and again.image_id == last.image_id
    spool.close()


def test_a_failed_folder_sync_fails_every_later_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a write-back error once: a retry on a new descriptor could pass with the renames not
    on disk, so after one failure the spool's folder syncs keep failing until a restart."""
    import appliance.ingest.spool_files as spool_files

    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    calls: list[Path] = []

    def failing_once(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_files, "fsync_dir", failing_once)
    assert isinstance(spool.accept(copy_to(real(NATIVE_DX), watch), "watch"), Accepted)
    with pytest.raises(OSError, match="Input/output error"):
        spool.settle_placements()
    (item,) = spool.claim()
    with pytest.raises(OSError, match="an earlier sync of the spool's folders failed"):
        spool.mark_done(item.image_id)
    assert len(calls) == 1 and spool.pending_count() == 1  # not done: the row rolled back
    spool.close()
