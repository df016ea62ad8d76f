"""The one intake: real files from ../shared/data/cxr, a real Spool in tmp, each rule under each source's rules."""

from __future__ import annotations

import errno
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from appliance.errors import InputRejected
from appliance.ingest import reasons
from appliance.ingest.intake import FOLDER, NETWORK, USB, Intake, Outcome, Verdict
from appliance.ingest.spool import Spool
from tests.ingest.conftest import JPEG_BASELINE, NATIVE_DX, copy_to, real
from testsupport.data import dicom_with


class Counted:
    """Stands in for Metrics: the reasons counted as quarantined."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def quarantined(self, reason: str) -> None:
        self.reasons.append(reason)


@pytest.fixture
def counted() -> Counted:
    return Counted()


@pytest.fixture
def intake(spool: Spool, counted: Counted) -> Intake:
    return Intake(spool, metrics=counted)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    return folder


def in_spool(spool: Spool, state: str) -> list[Path]:
    return sorted(p for p in (spool.root / state).iterdir() if not p.name.endswith(".reason.txt"))


def reason_files(spool: Spool) -> list[str]:
    return [p.read_text() for p in (spool.root / "quarantine").glob("*.reason.txt")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sr_report(path: Path) -> Path:
    """A Basic Text SR with File Meta: a DICOM, not an image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_real_dicom_is_accepted_then_a_duplicate(intake: Intake, spool: Spool, src: Path) -> None:
    first = intake.offer(copy_to(real(JPEG_BASELINE), src, "a.dcm"), "inbox", FOLDER)
    assert first.verdict is Verdict.ACCEPTED and first.image_id and first.key
    assert not (src / "a.dcm").exists() and len(in_spool(spool, "incoming")) == 1  # moved
    again = intake.offer(copy_to(real(JPEG_BASELINE), src, "b.dcm"), "usb", FOLDER)
    assert again == Outcome(Verdict.DUPLICATE, image_id=first.image_id, key=first.key)
    assert len(in_spool(spool, "incoming")) == 1


def test_usb_rules_copy_and_never_touch_the_source(
    intake: Intake, spool: Spool, src: Path, real_png: Path, real_jpeg: Path
) -> None:
    files = [copy_to(p, src) for p in (real(NATIVE_DX), real_png, real_jpeg)]
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in files}
    outcomes = [intake.offer(p, "usb:stick", USB) for p in files]
    assert [o.verdict for o in outcomes] == [Verdict.ACCEPTED] * 3
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in files} == before
    assert {sha(p) for p in in_spool(spool, "incoming")} == {h for h, _ in before.values()}


def test_while_not_accepting_nothing_is_taken_and_the_file_stays(
    spool: Spool, counted: Counted, src: Path
) -> None:
    intake = Intake(spool, metrics=counted, not_accepting=lambda: "spool disk full")
    path = copy_to(real(NATIVE_DX), src)
    for rules in (FOLDER, NETWORK, USB):
        assert intake.offer(path, "inbox", rules) == Outcome(Verdict.DEFERRED, "spool disk full")
    assert path.exists() and in_spool(spool, "incoming") == [] and in_spool(spool, "quarantine") == []
    assert counted.reasons == []


def test_a_full_spool_defers_tells_the_owner_and_keeps_the_file(
    tmp_path: Path, counted: Counted, src: Path
) -> None:
    full: list[str] = []
    spool = Spool(tmp_path / "full-spool", min_free_mb=1e12)  # no disk has that much free: always full
    try:
        intake = Intake(spool, metrics=counted, on_spool_full=full.append)
        path = copy_to(real(NATIVE_DX), src)
        got = intake.offer(path, "inbox", FOLDER)
        assert got.verdict is Verdict.DEFERRED and got.reason.startswith("the spool is full")
        assert len(full) == 1 and "not accepting" in full[0]
        assert path.exists() and in_spool(spool, "incoming") == []
    finally:
        spool.close()


def test_an_io_error_defers(intake: Intake, spool: Spool, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool, "accept", broken)
    path = copy_to(real(NATIVE_DX), src)
    assert intake.offer(path, "inbox", FOLDER) == Outcome(Verdict.DEFERRED, "I/O error: Input/output error")
    assert path.exists()


@pytest.mark.parametrize("rules", [FOLDER, NETWORK, USB], ids=["folder", "network", "usb"])
def test_the_size_limit_is_the_same_for_every_source(
    spool: Spool, counted: Counted, src: Path, rules: object
) -> None:
    intake = Intake(spool, metrics=counted, max_bytes=512 * 1024)
    big, small = copy_to(real(NATIVE_DX), src, "big.dcm"), copy_to(real(JPEG_BASELINE), src, "small.dcm")
    assert big.stat().st_size > intake.max_bytes > small.stat().st_size
    got = intake.offer(big, "src", rules)  # type: ignore[arg-type]
    assert got.verdict is Verdict.QUARANTINED and got.reason == reasons.FILE_TOO_LARGE
    assert "over ingest.max_file_mb (0.5 MB)" in got.detail
    assert counted.reasons == [reasons.FILE_TOO_LARGE]
    why = reason_files(spool)
    assert len(why) == 1 and f"reason: {reasons.FILE_TOO_LARGE}" in why[0] and "big.dcm" in why[0]
    assert big.exists() == (rules is USB)  # USB copies (never deletes); the others move it
    assert intake.offer(small, "src", rules).verdict is Verdict.ACCEPTED  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d.joinpath("notes.dcm").write_text("not an image\n" * 20), reasons.UNKNOWN_FORMAT),
        (lambda d: d.joinpath("empty.dcm").write_bytes(b""), reasons.EMPTY_FILE),
        (lambda d: sr_report(d / "SR000001"), reasons.NON_IMAGE_DICOM),
    ],
    ids=["text", "empty", "sr"],
)
def test_a_non_image_is_quarantined_from_folder_and_network_and_skipped_from_usb(
    intake: Intake, spool: Spool, counted: Counted, src: Path, make: object, reason: str
) -> None:
    make(src)  # type: ignore[operator]
    (path,) = src.iterdir()
    before = path.read_bytes()
    got = intake.offer(path, "usb:stick", USB)
    assert got.verdict is Verdict.SKIPPED and got.reason == reason
    assert path.read_bytes() == before and reason_files(spool) == [] and counted.reasons == []
    for rules in (NETWORK, FOLDER):
        copy = copy_to(path, src, f"copy-{rules.check_before_accept}")
        got = intake.offer(copy, "inbox", rules)
        assert got.verdict is Verdict.QUARANTINED and got.reason == reason
        assert not copy.exists()
    assert counted.reasons == [reason, reason] and len(reason_files(spool)) == 2
    assert in_spool(spool, "incoming") == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PixelData": None}, reasons.NO_PIXEL_DATA),
        ({"Rows": 30000, "Columns": 30000}, reasons.IMAGE_TOO_LARGE),
    ],
)
def test_only_network_rules_refuse_before_accepting_what_the_reader_would_refuse(
    intake: Intake, spool: Spool, counted: Counted, src: Path, change: dict[str, object], reason: str
) -> None:
    dicom_with(real(NATIVE_DX), src / "bad.dcm", change)
    got = intake.offer(copy_to(src / "bad.dcm", src, "net.dcm"), "dicom-net", NETWORK)
    assert got.verdict is Verdict.QUARANTINED and got.reason == reason
    assert counted.reasons == [reason] and not (src / "net.dcm").exists()
    # A folder or a stick gets no answer: the reader refuses it later, with a published result.
    assert intake.offer(src / "bad.dcm", "inbox", FOLDER).verdict is Verdict.ACCEPTED
    assert len(in_spool(spool, "incoming")) == 1 and counted.reasons == [reason]


def test_a_source_refusal_is_quarantined_and_counted(
    intake: Intake, spool: Spool, counted: Counted, src: Path
) -> None:
    path = copy_to(real(NATIVE_DX), src, "cut.dcm")
    refusal = InputRejected(reasons.TRUNCATED_DICOM, "cut.dcm: unchanged for 60 s")
    got = intake.refuse(path, "inbox", replace(FOLDER, move=False), refusal)
    assert got == Outcome(Verdict.QUARANTINED, reasons.TRUNCATED_DICOM, "cut.dcm: unchanged for 60 s")
    assert path.exists()  # move=False (ingest.delete_from_watch off): copied into quarantine
    assert counted.reasons == [reasons.TRUNCATED_DICOM]
    assert len(in_spool(spool, "quarantine")) == 1 and "reason: truncated DICOM" in reason_files(spool)[0]


def test_a_link_refused_by_the_spool_is_quarantined_and_counted(
    intake: Intake, spool: Spool, counted: Counted, src: Path
) -> None:
    path = copy_to(real(JPEG_BASELINE), src, "one.dcm")
    (src / "two.dcm").hardlink_to(path)  # a second name for a file that may change under us
    got = intake.offer(path, "inbox", FOLDER)
    assert got.verdict is Verdict.QUARANTINED and got.reason == reasons.HARD_LINK
    assert counted.reasons == [reasons.HARD_LINK]


def test_a_database_error_defers_instead_of_ending_the_source(
    intake: Intake, spool: Spool, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process (a USB import) holding the database past SQLite's busy timeout raised
    sqlite3.OperationalError out of offer: the import ended with a traceback."""
    import sqlite3

    def locked(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(spool, "accept", locked)
    path = copy_to(real(NATIVE_DX), src, "a.dcm")
    got = intake.offer(path, "usb", USB)
    assert got.verdict is Verdict.DEFERRED and "database is locked" in got.reason and path.is_file()
