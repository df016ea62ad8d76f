"""The spool with real files: states, de-duplication, quarantine, full disk, and recovery after SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pydicom
import pytest

from appliance.ingest import reasons
from appliance.ingest.identity import legacy_key
from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import STATES, Accepted, Duplicate, Rejected, SpoolFull
from appliance.store import Store
from tests.ingest.conftest import (
    JPEG_BASELINE,
    NATIVE_DX,
    copy_to,
    corrected,
    real,
    same_dataset_other_file_meta,
)
from testsupport.data import REPO, cxr_data, real_dicoms

# The spool's own database (opened without the appliance's store) and SQLite's WAL files beside it.
DB_FILES = ("spool.db", "spool.db-wal", "spool.db-shm")


def real_images(n: int) -> list[Path]:
    return sorted((cxr_data() / "images" / "cohen").glob("*.jpg"))[:n]


def test_accept_claim_done(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    src = copy_to(real(JPEG_BASELINE), watch, "scan.dcm")
    got = spool.accept(src, "watch")
    assert isinstance(got, Accepted) and not src.exists()
    assert got.path == spool.root / "incoming" / f"{got.image_id}.dcm" and got.path.is_file()
    # The first file of its SOP Instance UID: keyed by the UID alone (its dataset hashed only if the UID
    # comes again: tests below).
    assert got.key == "sop:1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    assert spool.pending_count() == 1
    item = spool.claim_next()
    assert item is not None and item.image_id == got.image_id and item.path.parent.name == "processing"
    assert item.original == str(src) and item.source == "watch"
    assert spool.claim_next() is None
    assert spool.mark_done(item.image_id) and spool.mark_done(item.image_id)  # idempotent
    assert (spool.root / "done" / item.path.name).is_file() and spool.pending_count() == 0
    assert not spool.mark_done("0" * 64)


def test_a_claim_whose_transaction_rolled_back_after_the_move_is_claimed_again_not_lost(
    tmp_path: Path,
) -> None:
    """A full disk can fail the claim's commit after its file moved to processing/: the row still says
    incoming, and the next claim takes the file from processing/ instead of forgetting it."""
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    got = spool.accept(copy_to(real(JPEG_BASELINE), watch, "scan.dcm"), "watch")
    assert isinstance(got, Accepted)
    with pytest.raises(SpoolFull), spool._tx():  # the claim's transaction fails at its commit
        assert spool.claim_next() is not None
        raise SpoolFull("disk full at the commit")
    assert not got.path.exists() and (spool.root / "processing" / got.path.name).is_file()
    assert spool.pending_count() == 1  # the row rolled back: still waiting
    item = spool.claim_next()
    assert item is not None and item.image_id == got.image_id and item.path.is_file()
    assert spool.mark_done(item.image_id) and (spool.root / "done" / got.path.name).is_file()


def test_duplicates_from_two_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    a, b, usb = tmp_path / "a", tmp_path / "b", tmp_path / "usb"
    for d in (a, b, usb):
        d.mkdir()
    # The same DICOM and the same PNG bytes from a second folder.
    first = spool.accept(copy_to(real(JPEG_BASELINE), a), "a")
    again = spool.accept(copy_to(real(JPEG_BASELINE), b, "renamed.dcm"), "b")
    assert isinstance(first, Accepted) and isinstance(again, Duplicate)
    assert again.image_id == first.image_id and again.first_source == "a" and again.source_removed
    assert not list(b.iterdir())
    jpg = real_images(1)[0]
    one = spool.accept(copy_to(jpg, a), "a")
    left = copy_to(jpg, usb, "other-name.jpg")
    two = spool.accept(left, "usb", move=False)  # read-only media: left alone
    assert (
        isinstance(one, Accepted) and isinstance(two, Duplicate) and not two.source_removed and left.exists()
    )
    assert one.key.startswith("sha256:")
    # Still a duplicate after a restart and after the first copy was processed.
    spool.close()
    spool = Spool(tmp_path / "spool")
    spool.recover()
    while (item := spool.claim_next()) is not None:
        spool.mark_done(item.image_id)
    assert isinstance(spool.accept(copy_to(jpg, b), "b"), Duplicate)
    assert len(list((spool.root / "done").iterdir())) == 2


def test_copy_from_read_only_source(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    usb = tmp_path / "usb"
    usb.mkdir()
    src = copy_to(real_images(1)[0], usb)
    got = spool.accept(src, "usb", move=False)
    assert isinstance(got, Accepted) and src.exists()
    assert got.path.read_bytes() == src.read_bytes()
    assert not list((spool.root / "tmp").iterdir())


def test_quarantine_with_reason_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    text = watch / "notes.dcm"
    text.write_text("not an image")
    bad = spool.accept(text, "watch")
    assert isinstance(bad, Rejected) and bad.reason == reasons.UNKNOWN_FORMAT and bad.quarantined is not None
    assert bad.quarantined.read_text() == "not an image" and not text.exists()
    why = Path(str(bad.quarantined) + ".reason.txt").read_text()
    assert f"reason: {reasons.UNKNOWN_FORMAT}" in why and str(text) in why and "source: watch" in why
    # An accepted image that later fails to decode: quarantined by id, out of the pending count.
    got = spool.accept(copy_to(real(JPEG_BASELINE), watch), "watch")
    assert isinstance(got, Accepted)
    item = spool.claim_next()
    assert item is not None
    where = spool.quarantine(item.image_id, reasons.DECODE_FAILED, "test")
    assert where is not None and where.is_file() and where.parent.name == "quarantine"
    assert "reason: decode failed" in Path(str(where) + ".reason.txt").read_text()
    assert spool.pending_count() == 0


def test_reason_file_escapes_control_characters_in_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    # A newline that would forge a "reason:" line, a terminal escape, and a byte that is not UTF-8.
    forged = watch / "scan.dcm\nreason: accepted\x1b[2J"
    undecodable = watch / os.fsdecode(b"scan-\xff.dcm")
    texts = []
    for path in (forged, undecodable):
        path.write_text("not an image")
        bad = spool.accept(path, "usb\nsource: watch")
        assert isinstance(bad, Rejected) and bad.quarantined is not None
        text = Path(str(bad.quarantined) + ".reason.txt").read_text(encoding="utf-8")
        lines = text.splitlines()
        assert [line.split(":")[0] for line in lines] == ["reason", "detail", "source", "original", "time"]
        assert lines[2] == "source: usb\\nsource: watch" and "\x1b" not in text
        texts.append(text)
    assert "original: " + str(watch) + "/scan.dcm\\nreason: accepted\\x1b[2J\n" in texts[0]
    assert "original: " + str(watch) + "/scan-\\udcff.dcm\n" in texts[1]


def test_reserve_and_full_disk(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    src = copy_to(real(JPEG_BASELINE), watch)
    greedy = Spool(tmp_path / "spool", min_free_mb=10**12)
    with pytest.raises(SpoolFull, match="not accepting"):
        greedy.accept(src, "watch")
    assert src.exists() and greedy.free_mb() > 0 and greedy.pending_count() == 0


def test_enospc_on_a_tiny_filesystem(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here to fill a disk for real: {done.stderr.decode().strip()}"
        )
    spool = None
    try:
        spool = Spool(mnt / "spool")
        usb = tmp_path / "usb"
        usb.mkdir()
        outcomes: list[str] = []
        for i, src in enumerate(real_images(12)):
            staged = copy_to(src, usb, f"{i}.jpg")
            try:
                spool.accept(staged, "usb", move=False)  # another filesystem: copy + fsync + rename
                outcomes.append("ok")
            except SpoolFull as exc:
                assert "ENOSPC" in str(exc) or "not accepting" in str(exc)
                outcomes.append("full")
        assert "ok" in outcomes and outcomes[-1] == "full"
        assert not list((spool.root / "tmp").iterdir()), "no half-written copies left behind"
        assert spool.pending_count() == outcomes.count("ok")
        assert all((usb / f"{i}.jpg").exists() for i in range(len(outcomes))), "sources kept"
    finally:
        if spool is not None:
            spool.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from appliance.ingest.spool import Spool
    spool = Spool(Path(sys.argv[1]))
    spool.recover()
    for src in sorted(Path(sys.argv[2]).iterdir()):
        spool.accept(src, "watch")
        if spool.claim_next() is not None:
            print("claimed", flush=True)  # the parent kills us while the image is in processing/
        time.sleep(0.05)
    time.sleep(60)
    """
)


def test_recovery_after_sigkill(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    images = real_images(20)
    for i, src in enumerate(images):
        copy_to(src, watch, f"{i:02d}.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "spool"), str(watch)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    for claims, _ in enumerate(child.stdout, start=1):
        if claims == 5:
            child.send_signal(signal.SIGKILL)  # kill -9 mid-run
            break
    child.wait(30)
    assert child.returncode == -signal.SIGKILL
    spool = Spool(tmp_path / "spool")
    assert len(list((spool.root / "processing").iterdir())) >= 1
    assert spool.recover() >= 1
    # A restarted watcher offers the files still in the watch folder again; all are accepted exactly once.
    for src in sorted(watch.iterdir()):
        assert isinstance(spool.accept(src, "watch"), Accepted | Duplicate)
    seen: list[str] = []
    while (item := spool.claim_next()) is not None:
        seen.append(item.image_id)
        spool.mark_done(item.image_id)
    done = {p.name.split(".")[0] for p in (spool.root / "done").iterdir()}
    assert len(seen) == len(set(seen)) and done == set(seen) and len(done) == len(images)
    assert spool.recover() == 0 and spool.pending_count() == 0


def test_concurrent_accept_and_claim(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    srcs = [copy_to(p, watch) for p in real_images(30)]
    claimed: list[str] = []
    finished = threading.Event()

    def consume() -> None:
        while not (finished.is_set() and spool.pending_count() == 0):
            item = spool.claim_next()
            if item is None:
                time.sleep(0.005)
                continue
            claimed.append(item.image_id)
            spool.mark_done(item.image_id)

    worker = threading.Thread(target=consume)
    worker.start()
    accepted = [spool.accept(s, "watch") for s in srcs]
    finished.set()
    worker.join(30)
    ids = {a.image_id for a in accepted if isinstance(a, Accepted)}
    assert sorted(claimed) == sorted(ids) and len(ids) == len(set(p.read_bytes() for p in real_images(30)))


def test_the_acceptance_is_recorded_in_utc_without_a_file_per_image(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "w").mkdir()
    got = spool.accept(copy_to(real_images(1)[0], tmp_path / "w"), "w")
    assert isinstance(got, Accepted)
    assert (spool.accepted_at(got.image_id) or "").endswith("+00:00")
    assert sorted(p.name for p in spool.root.iterdir()) == sorted([*STATES, "tmp", "image-id.key", *DB_FILES])


def test_a_dicom_an_older_version_keyed_with_sha256_is_still_recognised(tmp_path: Path) -> None:
    root, watch = tmp_path / "spool", tmp_path / "w"
    watch.mkdir()
    spool = Spool(root)
    first = spool.accept(copy_to(real(JPEG_BASELINE), watch, "a.dcm"), "w")
    assert isinstance(first, Accepted)
    older = legacy_key(first.path, first.key)
    spool.close()
    assert older is not None and older.startswith("sop:") and "/sha256:" in older
    with contextlib.closing(sqlite3.connect(root / "spool.db")) as db:  # the row as versions before wrote it
        db.execute("UPDATE items SET key = ? WHERE image_id = ?", (older, first.image_id))
        db.commit()
    spool = Spool(root)
    again = spool.accept(copy_to(real(JPEG_BASELINE), watch, "b.dcm"), "w")
    assert isinstance(again, Duplicate) and again.image_id == first.image_id and again.key == older
    spool.close()


def test_an_older_spool_database_and_its_sidecars_are_adopted_into_the_store(tmp_path: Path) -> None:
    root, watch = tmp_path / "spool", tmp_path / "w"
    watch.mkdir()
    images = real_images(3)
    older = Spool(root)  # on its own: rows in spool/spool.db, where an older version kept them
    first, second = (older.accept(copy_to(p, watch), "w") for p in images[:2])
    item = older.claim_next()
    assert item is not None and older.mark_done(item.image_id)
    (root / "meta").mkdir()
    (root / "meta" / f"{item.image_id}.json").write_text("{}")  # an older version's sidecar
    older.close()

    store = Store(tmp_path / "appliance.sqlite3")
    spool = Spool(root, store=store)
    assert spool.adopt(root / "spool.db") == 2
    assert not (root / "spool.db").exists() and spool.adopt(root / "spool.db") == 0
    assert spool.recover() == 0 and not (root / "meta").exists()
    assert spool.pending_count() == 1
    again = spool.accept(copy_to(images[0], watch), "w")  # the adopted keys still recognise a re-send
    assert isinstance(first, Accepted) and isinstance(again, Duplicate) and again.image_id == first.image_id
    third = spool.accept(copy_to(images[2], watch), "w")
    assert isinstance(second, Accepted) and isinstance(third, Accepted)
    assert [i.image_id for i in spool.claim(5)] == [second.image_id, third.image_id]  # arrival order kept
    store.close()


# -- Hardening II: de-duplication on SOPInstanceUID + content ------------------------------------------


@pytest.mark.parametrize(("name", "pixel"), [(NATIVE_DX, True), (JPEG_BASELINE, False)])
def test_a_corrected_resend_under_the_same_uid_is_analysed(tmp_path: Path, name: str, pixel: bool) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(name), watch, "first.dcm"), "dicom-net")
    same = spool.accept(same_dataset_other_file_meta(real(name), watch / "same.dcm"), "usb")
    fixed = spool.accept(corrected(real(name), watch / "fixed.dcm", pixel=pixel), "dicom-net")
    fixed_again = spool.accept(corrected(real(name), watch / "fixed-again.dcm", pixel=pixel), "dicom-net")
    assert isinstance(first, Accepted) and isinstance(same, Duplicate) and same.image_id == first.image_id
    assert isinstance(fixed, Accepted) and fixed.image_id != first.image_id
    assert isinstance(fixed_again, Duplicate) and fixed_again.image_id == fixed.image_id
    uid = str(pydicom.dcmread(real(name), stop_before_pixels=True).SOPInstanceUID)
    assert first.key.split("/")[0] == fixed.key.split("/")[0] == f"sop:{uid}" and first.key != fixed.key
    assert not list(watch.iterdir())
    # Both are analysed: the first (or a forgery that took the UID first) does not hide the other.
    claimed = spool.claim(5)
    assert [i.image_id for i in claimed] == [first.image_id, fixed.image_id]
    assert claimed[1].path.read_bytes() != claimed[0].path.read_bytes()
    for item in claimed:
        spool.mark_done(item.image_id)
    spool.close()
    spool = Spool(tmp_path / "spool")  # the keys survive a restart
    assert spool.recover() == 0
    again = spool.accept(corrected(real(name), watch / "third.dcm", pixel=pixel), "dicom-net")
    assert isinstance(again, Duplicate) and again.image_id == fixed.image_id
    assert spool.pending_count() == 0


def test_a_resend_after_quarantine_is_analysed_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    watch = tmp_path / "watch"
    watch.mkdir()
    first = spool.accept(copy_to(real(NATIVE_DX), watch), "dicom-net")
    assert isinstance(first, Accepted)
    item = spool.claim_next()
    assert item is not None and item.image_id == first.image_id
    kept = spool.quarantine(item.image_id, reasons.DECODE_FAILED, "backend error")
    assert kept is not None and kept.is_file()
    # The unit sends the very same instance again: a new id (the journal keeps the error result under
    # the first), analysed; the first attempt stays in quarantine/ with its reason.
    retry = spool.accept(copy_to(real(NATIVE_DX), watch), "dicom-net")
    assert isinstance(retry, Accepted) and retry.key == first.key and retry.image_id != first.image_id
    assert retry.path.read_bytes() == real(NATIVE_DX).read_bytes()
    assert kept.is_file() and Path(f"{kept}.reason.txt").is_file()
    assert isinstance(spool.accept(copy_to(real(NATIVE_DX), watch), "usb"), Duplicate)  # while it waits
    spool.close()
    spool = Spool(tmp_path / "spool")
    assert spool.recover() == 0 and spool.pending_count() == 1  # a restart keeps both as they are
    assert kept.is_file()
    item = spool.claim_next()
    assert item is not None and item.image_id == retry.image_id
    # Refused again, and sent a third time: another try; once analysed, a re-send is a duplicate.
    spool.quarantine(item.image_id, reasons.DECODE_FAILED, "again")
    third = spool.accept(copy_to(real(NATIVE_DX), watch), "dicom-net")
    assert isinstance(third, Accepted) and third.image_id not in (first.image_id, retry.image_id)
    item = spool.claim_next()
    assert item is not None and item.image_id == third.image_id
    spool.mark_done(item.image_id)
    done = spool.accept(copy_to(real(NATIVE_DX), watch), "dicom-net")
    assert isinstance(done, Duplicate) and done.image_id == third.image_id
    assert len([p for p in (spool.root / "quarantine").iterdir() if p.suffix == ".dcm"]) == 2


def test_image_ids_are_keyed_per_cart_and_dedup_still_holds(tmp_path: Path) -> None:
    import hashlib

    from appliance.ingest.identity import dicom_uid, uid_key

    source = real_dicoms()[0]
    ids = []
    for name, secret in (("a", b"k" * 32), ("b", b"k" * 32), ("c", b"other-cart-secret!")):
        spool = Spool(tmp_path / name, id_secret=secret)
        (tmp_path / f"{name}.dcm").write_bytes(source.read_bytes())
        first = spool.accept(tmp_path / f"{name}.dcm", "inbox")
        (tmp_path / f"{name}.dcm").write_bytes(source.read_bytes())
        assert isinstance(spool.accept(tmp_path / f"{name}.dcm", "inbox"), Duplicate)
        assert isinstance(first, Accepted)
        ids.append(first.image_id)
        spool.close()
    assert ids[0] == ids[1] != ids[2]  # same image, same key: same id; another secret: another id
    assert ids[0] != hashlib.sha256(uid_key(str(dicom_uid(source))).encode()).hexdigest()  # the spool's key
    own = Spool(tmp_path / "d")  # no secret given: a key file of its own, private
    assert (tmp_path / "d" / "image-id.key").stat().st_mode & 0o077 == 0
    own.close()


def test_symlinks_and_hard_links_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = tmp_path / "elsewhere.dcm"
    target.write_bytes(real_dicoms()[0].read_bytes())
    (inbox / "link.dcm").symlink_to(target)
    os.link(target, inbox / "hard.dcm")
    soft = spool.accept(inbox / "link.dcm", "inbox")
    hard = spool.accept(inbox / "hard.dcm", "inbox")
    assert isinstance(soft, Rejected) and "symbolic link" in soft.detail
    assert isinstance(hard, Rejected) and hard.reason == reasons.HARD_LINK
    assert list((spool.root / "incoming").iterdir()) == []
    assert target.read_bytes() == real_dicoms()[0].read_bytes()  # the other name's file is untouched
    spool.close()


def test_a_spool_folder_that_cannot_be_made_is_a_plain_error(tmp_path: Path) -> None:
    """Found by a review run: a read-only or mistyped spool gave a PermissionError traceback at start."""
    from appliance.errors import UserError

    root = tmp_path / "spool"
    root.mkdir()
    (root / "incoming").write_text("not a folder")
    with pytest.raises(UserError, match=r"incoming: cannot create: is not a folder"):
        Spool(root)
