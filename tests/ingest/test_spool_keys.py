"""The spool's keys: the first file of a SOP Instance UID is not hashed; a repeat of the UID is told apart
by the dataset hash, also after the first file left the spool."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

import appliance.ingest.spool_keys as spool_keys
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted, Duplicate
from tests.ingest.conftest import (
    JPEG_BASELINE,
    NATIVE_DX,
    copy_to,
    corrected,
    real,
    same_dataset_other_file_meta,
)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose dataset the spool hashes (the real hash, recorded)."""
    seen: list[Path] = []
    real_hash: Callable[..., str] = spool_keys.dataset_hash

    def recorded(path: Path, mappable_device: int | None = None) -> str:
        seen.append(Path(path))
        return real_hash(path, mappable_device)

    monkeypatch.setattr(spool_keys, "dataset_hash", recorded)
    return seen


def _stored_hash(spool: Spool, image_id: str) -> str | None:
    row = spool._db.execute("SELECT dataset_hash FROM items WHERE image_id = ?", (image_id,)).fetchone()
    return None if row is None else row[0]


def _first_done(tmp_path: Path) -> tuple[Spool, Path, Accepted]:
    """A spool whose first image (the NIH DX) was analysed: its file in done/."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    assert isinstance(first, Accepted)
    item = spool.claim_next()
    assert item is not None and spool.mark_done(item.image_id)
    return spool, watch, first


def test_only_a_repeated_uid_is_hashed_and_the_first_hash_is_kept(tmp_path: Path, hashed: list[Path]) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    assert isinstance(first, Accepted) and hashed == []  # nothing on the way of a new image
    assert _stored_hash(spool, first.image_id) is None

    again = spool.accept(same_dataset_other_file_meta(real(NATIVE_DX), watch / "again.dcm"), "dicom-net")
    assert isinstance(again, Duplicate) and again.image_id == first.image_id and again.key == first.key
    # The repeat, then the first where it lies (incoming/): its hash is kept in its row.
    assert [p.name for p in hashed] == ["again.dcm", first.path.name]
    assert _stored_hash(spool, first.image_id) is not None

    hashed.clear()
    third = spool.accept(copy_to(real(NATIVE_DX), watch, "third.dcm"), "usb", move=False)
    assert isinstance(third, Duplicate) and third.image_id == first.image_id
    assert [p.name for p in hashed] == ["third.dcm"]  # once for the copy check and the admission
    spool.close()


def test_a_resend_after_the_first_file_was_purged_is_still_told_apart(
    tmp_path: Path, hashed: list[Path]
) -> None:
    spool, watch, first = _first_done(tmp_path)
    done = spool.root / "done" / first.path.name
    old = time.time() - 3600
    os.utime(done, (old, old))
    assert spool.purge_done(60) == 1 and not done.exists()
    assert [p.name for p in hashed] == [first.path.name]  # hashed once, just before it went
    assert _stored_hash(spool, first.image_id) is not None

    same = spool.accept(copy_to(real(NATIVE_DX), watch, "same.dcm"), "watch")
    fixed = spool.accept(corrected(real(NATIVE_DX), watch / "fixed.dcm", pixel=True), "watch")
    assert isinstance(same, Duplicate) and same.image_id == first.image_id
    assert isinstance(fixed, Accepted) and fixed.image_id != first.image_id and "/blake3:" in fixed.key
    spool.close()


def test_a_resend_whose_first_file_is_gone_unhashed_is_analysed(tmp_path: Path) -> None:
    """Nothing to compare with (a file deleted by hand): analysing again is the safe side."""
    spool, watch, first = _first_done(tmp_path)
    (spool.root / "done" / first.path.name).unlink()
    again = spool.accept(copy_to(real(NATIVE_DX), watch, "again.dcm"), "watch")
    assert (
        isinstance(again, Accepted)
        and again.image_id != first.image_id
        and again.key.startswith(f"{first.key}/")
    )
    spool.close()


@pytest.mark.parametrize("lost", ["the corrected one's", "both"])
def test_orphans_of_a_repeated_uid_get_back_the_keys_their_ids_were_made_from(
    tmp_path: Path, lost: str
) -> None:
    """Files renamed into incoming/ whose rows a power cut lost (the rows are not synced at acceptance):
    recovery finds them in id order, not in the order they came; each still gets the key its id came
    from (the first of its UID by the UID alone, the corrected one hashed)."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    fixed = spool.accept(corrected(real(NATIVE_DX), watch / "fixed.dcm", pixel=True), "watch")
    assert isinstance(first, Accepted) and isinstance(fixed, Accepted)
    ids = (fixed.image_id,) if lost == "the corrected one's" else (fixed.image_id, first.image_id)
    spool._db.execute(f"DELETE FROM items WHERE image_id IN ({', '.join('?' * len(ids))})", ids)
    spool.close()
    spool = Spool(tmp_path / "spool")
    assert spool.recover() == 0
    keys = dict(spool._db.execute("SELECT image_id, key FROM items").fetchall())
    assert keys == {first.image_id: first.key, fixed.image_id: fixed.key}
    assert {i.image_id for i in spool.claim(5)} == {first.image_id, fixed.image_id}
    spool.close()


def _with_uid(src: Path, dest: Path, uid: str, *, pixel: bool = False) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.UID(uid)
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(uid)
    if pixel:
        data = bytearray(ds.PixelData)
        data[len(data) // 2] ^= 0x01
        ds.PixelData = bytes(data)
    ds.save_as(dest)
    return dest


def test_a_uid_that_is_not_one_is_always_hashed_and_cannot_forge_a_key(tmp_path: Path) -> None:
    """Keys are 'sop:<UID>' and 'sop:<UID>/blake3:<hash>': a "UID" holding '/' or '#' must not be able to
    take another image's key (the real image would be dropped as its duplicate)."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    real_uid = "1.2.826.0.1.3680043.9.7777.1"
    genuine = _with_uid(real(NATIVE_DX), tmp_path / "genuine.dcm", real_uid)
    corrected_copy = _with_uid(real(NATIVE_DX), tmp_path / "corrected.dcm", real_uid, pixel=True)
    digest = spool_keys.dataset_hash(corrected_copy)
    forged = _with_uid(real(JPEG_BASELINE), watch / "forged.dcm", f"{real_uid}/blake3:{digest}")
    odd = _with_uid(real(JPEG_BASELINE), watch / "odd.dcm", "1.2#3")
    got = [spool.accept(p, "watch") for p in (forged, odd)]
    got_ids = [g.image_id for g in got if isinstance(g, Accepted) and "/blake3:" in g.key]
    assert len(got_ids) == 2
    first = spool.accept(copy_to(genuine, watch, "first.dcm"), "watch")
    fixed = spool.accept(copy_to(corrected_copy, watch, "fixed.dcm"), "watch")
    assert isinstance(first, Accepted) and isinstance(fixed, Accepted)
    # Nobody's duplicate: the forgery's key shares the UID's range, so the genuine files are hashed too.
    assert len({*got_ids, first.image_id, fixed.image_id}) == 4
    assert fixed.key == f"sop:{real_uid}/blake3:{digest}"
    odd_again = spool.accept(_with_uid(real(JPEG_BASELINE), watch / "odd2.dcm", "1.2#3"), "watch")
    assert isinstance(odd_again, Duplicate)
    assert odd_again.image_id == got_ids[1]  # hashed, the same instance is still one image
    spool.close()


def test_a_first_file_that_cannot_be_read_does_not_block_its_uid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error on the first file: the re-send cannot be compared with it, so it is analysed
    (before: the error stopped every later file of that UID)."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    assert isinstance(first, Accepted)
    real_hash = spool_keys.dataset_hash

    def failing_disk(path: Path, mappable_device: int | None = None) -> str:
        if Path(path).name == first.path.name:
            raise OSError(errno.EIO, "Input/output error")
        return real_hash(path, mappable_device)

    monkeypatch.setattr(spool_keys, "dataset_hash", failing_disk)
    again = spool.accept(copy_to(real(NATIVE_DX), watch, "again.dcm"), "watch")
    assert isinstance(again, Accepted) and again.image_id != first.image_id
    spool.close()


def test_retention_hashes_within_a_budget_and_a_failed_hash_does_not_stop_it(
    tmp_path: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    got = [
        spool.accept(p, "watch")
        for p in (copy_to(real(NATIVE_DX), watch), copy_to(real(JPEG_BASELINE), watch))
    ]
    for item in spool.claim(2):
        spool.mark_done(item.image_id)
    old = time.time() - 3600
    for path in (spool.root / "done").iterdir():
        os.utime(path, (old, old))
    monkeypatch.setattr(spool_keys, "PURGE_HASH_BUDGET_S", -1.0)  # this pass has no time left
    assert spool.purge_done(60) == 0 and len(list((spool.root / "done").iterdir())) == 2 and hashed == []
    # The database refuses the hash (a full disk gives a real sqlite3 error the same way): deleted anyway.
    spool._db.execute(
        "CREATE TRIGGER refuse_hash BEFORE UPDATE OF dataset_hash ON items"
        " BEGIN SELECT RAISE(ABORT, 'refused (test)'); END"
    )
    monkeypatch.setattr(spool_keys, "PURGE_HASH_BUDGET_S", 10.0)
    assert spool.purge_done(60) == 2 and len(hashed) == 2
    assert all(isinstance(g, Accepted) and _stored_hash(spool, g.image_id) is None for g in got)
    spool.close()


def test_a_folder_sync_that_fails_after_the_copy_takes_the_copy_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing half-accepted: a copy (read-only media) was placed in incoming/, its folder sync failed; the
    copy is gone again and the source is offered again (before: left in incoming/ without a row)."""
    import appliance.ingest.spool_accept as spool_accept

    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    source = copy_to(real(NATIVE_DX), watch, "a.dcm")

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_accept, "fsync_dir", failing)
    with pytest.raises(OSError, match="Input/output error"):
        spool.accept(source, "usb", move=False)
    assert source.is_file() and not list((spool.root / "incoming").iterdir()) and spool.pending_count() == 0
    spool.close()


@pytest.mark.parametrize("wake_first", [False, True])
def test_a_renamed_file_is_synced_before_its_end_can_reach_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wake_first: bool
) -> None:
    """A file renamed from the watched folder is not synced when it is accepted (an atomic rename: after a
    power cut it lies in one folder or the other, and keeps its key); its folders are synced before the
    row saying it is done can reach the disk: before COMMIT, with `wake_first` too. A second image's end
    finds nothing left to sync."""
    import appliance.ingest.spool_accept as spool_accept
    import appliance.ingest.spool_files as spool_files

    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    seen: list[str] = []
    real_sync = spool.store.sync

    def committed() -> bool:
        other = sqlite3.connect(spool.store.path)
        try:
            rows = other.execute("SELECT state FROM items").fetchall()
        finally:
            other.close()
        return ("done",) in rows

    def synced(path: Path) -> None:
        seen.append(f"fsync {path.name}" + (" after COMMIT" if committed() else " before COMMIT"))

    def sync() -> None:
        seen.append("sync")
        real_sync()

    monkeypatch.setattr(spool_accept, "fsync_dir", lambda path: seen.append("accept fsync"))
    monkeypatch.setattr(spool_files, "fsync_dir", synced)
    monkeypatch.setattr(spool.store, "sync", sync)
    got = spool.accept(copy_to(real(NATIVE_DX), watch, "a.dcm"), "watch")
    assert isinstance(got, Accepted) and seen == []
    (item,) = spool.claim()
    with spool.store.transaction(wake_first=wake_first):
        spool.mark_done(item.image_id)
        spool.store.after_commit(lambda: seen.append("wake sender"), before_sync=True)
    in_order = ["fsync incoming before COMMIT", "fsync processing before COMMIT"]
    assert seen == [*in_order, "wake sender", "sync"] if wake_first else [*in_order, "wake sender"]
    assert (spool.root / "done" / item.path.name).is_file()
    seen.clear()
    other = copy_to(real(JPEG_BASELINE), watch, "b.dcm")
    assert isinstance(spool.accept(other, "usb", move=False), Accepted)
    assert seen == ["accept fsync"]  # a copy is synced at once; nothing renamed waits since the last end
    (item,) = spool.claim()
    with spool.store.transaction():
        spool.mark_done(item.image_id)
    assert seen == ["accept fsync"]
    spool.close()


def test_a_file_from_another_filesystem_is_copied_before_the_transaction(tmp_path: Path) -> None:
    """A watched folder on another filesystem: the copy is made under tmp/ first (the write transaction
    must not be held through a 500 MB copy), then placed; the original goes once the copy is durable."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem here (/dev/shm)")
    spool = Spool(tmp_path / "spool")
    watch = Path(tempfile.mkdtemp(dir=shm))
    try:
        got = spool.accept(copy_to(real(NATIVE_DX), watch, "a.dcm"), "watch")
        assert isinstance(got, Accepted) and got.path.read_bytes() == real(NATIVE_DX).read_bytes()
        assert not list(watch.iterdir()) and not list((spool.root / "tmp").iterdir())
        again = spool.accept(copy_to(real(NATIVE_DX), watch, "b.dcm"), "watch")
        assert isinstance(again, Duplicate) and not list(watch.iterdir())
    finally:
        shutil.rmtree(watch, ignore_errors=True)
        spool.close()
