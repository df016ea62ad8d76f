"""The spool's keys: the first file of a SOP Instance UID is not hashed; a repeat of the UID is told apart
by the dataset hash, also after the first file left the spool."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import appliance.ingest.spool_keys as spool_keys
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted, Duplicate
from tests.ingest.conftest import NATIVE_DX, copy_to, corrected, real, same_dataset_other_file_meta


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
    assert [p.name for p in hashed] == [
        "third.dcm",
        "third.dcm",
    ]  # the copy check and the admission; not the first
    spool.close()


def test_a_resend_after_the_first_file_was_purged_is_still_told_apart(
    tmp_path: Path, hashed: list[Path]
) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    assert isinstance(first, Accepted)
    item = spool.claim_next()
    assert item is not None and spool.mark_done(item.image_id)
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
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    assert isinstance(first, Accepted)
    item = spool.claim_next()
    assert item is not None and spool.mark_done(item.image_id)
    (spool.root / "done" / first.path.name).unlink()
    again = spool.accept(copy_to(real(NATIVE_DX), watch, "again.dcm"), "watch")
    assert (
        isinstance(again, Accepted)
        and again.image_id != first.image_id
        and again.key.startswith(f"{first.key}/")
    )
    spool.close()


def test_an_orphan_of_a_repeated_uid_is_registered_under_its_hashed_key(tmp_path: Path) -> None:
    """A corrected re-send renamed into incoming/ whose row a kill cut off: recovery keys it as the
    admission did (the UID is held by the first file, the content differs)."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch, "first.dcm"), "watch")
    fixed = spool.accept(corrected(real(NATIVE_DX), watch / "fixed.dcm", pixel=True), "watch")
    assert isinstance(first, Accepted) and isinstance(fixed, Accepted)
    spool._db.execute("DELETE FROM items WHERE image_id = ?", (fixed.image_id,))
    spool.close()
    spool = Spool(tmp_path / "spool")
    assert spool.recover() == 0
    row = spool._db.execute("SELECT key FROM items WHERE image_id = ?", (fixed.image_id,)).fetchone()
    assert row is not None and row[0] == fixed.key
    assert [i.image_id for i in spool.claim(5)] == [first.image_id, fixed.image_id]
    spool.close()
