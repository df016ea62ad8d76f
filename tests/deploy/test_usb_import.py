"""USB import on a folder that looks like a stick (real images, a DICOMDIR, junk, hostile entries),
on a real read-only FAT image when loop devices work here, and through the CLI with MQTT progress."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from appliance import usb_import
from appliance.config import AppConfig, IngestConfig, JournalConfig, MqttConfig, PrivacyConfig
from appliance.errors import UserError
from appliance.ingest.spool import Spool
from testsupport.data import cxr_data, real_dicoms
from testsupport.mosquitto import Broker, Subscriber

REPO = Path(__file__).resolve().parents[2]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every regular file on the stick with its content hash and mtime: the import must change none."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = (sha(p), p.stat().st_mtime_ns)
    return out


def usable_dicom(source: Path, new_uid: bool = False) -> Dataset:
    """A real DICOM with the few attributes a DICOMDIR record needs (some exports leave them empty)."""
    ds = pydicom.dcmread(source)
    needed = (
        ("StudyID", "1"),
        ("StudyDate", "20240101"),
        ("StudyTime", "120000"),
        ("SeriesNumber", 1),
        ("InstanceNumber", 1),
        ("PatientID", "P1"),
    )
    for keyword, value in needed:
        if not ds.get(keyword):
            setattr(ds, keyword, value)
    if new_uid:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def patch_file_id(dicomdir: Path, old: list[str], new: str) -> None:
    """Rewrite one ReferencedFileID in place, same length, so the record offsets stay valid."""
    data = dicomdir.read_bytes()
    raw_old = "\\".join(old).encode()
    raw_old += b" " * (len(raw_old) % 2)
    raw_new = new.encode().ljust(len(raw_old))
    assert len(raw_new) == len(raw_old) and data.count(raw_old) == 1
    dicomdir.write_bytes(data.replace(raw_old, raw_new))


def dicomdir_ids(dicomdir: Path) -> list[list[str]]:
    ds = pydicom.dcmread(dicomdir)
    return [list(r.ReferencedFileID) for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]


@dataclass
class Stick:
    root: Path
    images: set[str] = field(default_factory=set)  # sha256 of every distinct image that must arrive
    duplicates: int = 0
    refused: int = 0
    skipped: int = 0
    missing: int = 0


def build_stick(root: Path, hostile: bool = True) -> Stick:
    """Real images in nested folders with a DICOMDIR; `hostile` adds what FAT cannot hold."""
    stick = Stick(root)
    root.mkdir(parents=True)
    # A DICOMDIR at the top, written by pydicom's FileSet, over two real DICOMs.
    fs = FileSet()
    unique_sops: dict[str, Path] = {}
    for path in real_dicoms():
        unique_sops.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID), path)
    for path in unique_sops.values():
        fs.add(usable_dicom(path))
    fs.write(root)
    for file_id in dicomdir_ids(root / "DICOMDIR"):
        stick.images.add(sha(root.joinpath(*file_id)))
    stick.skipped += 1  # the DICOMDIR itself

    # Real PNG/JPEG files, nested, with awkward names, and one duplicate.
    data = cxr_data() / "images"
    rasters = [*sorted((data / "txv").iterdir()), *sorted((data / "cohen").glob("*.png"))[:2]]
    targets = [
        "images/a/b/c/deep.png",
        "IMG 0001.JPG",
        "Thorax_ä.png",
        "-rf.png",
        "images/x.png",
        "images/y.png",
    ]
    for src, rel in zip(rasters, targets, strict=False):
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        if sha(dest) in stick.images:
            stick.duplicates += 1  # the data folder holds byte-identical copies of a few images
        stick.images.add(sha(dest))
    shutil.copyfile(root / "IMG 0001.JPG", root / "images" / "copy-of-0001.jpg")
    stick.duplicates += 1

    # Not images: skipped, not quarantined.
    (root / "README.TXT").write_text("Exported by the X-ray unit\n")
    (root / "autorun.inf").write_text("[autorun]\nopen=evil.exe\n")
    (root / "images" / "empty.dcm").write_bytes(b"")
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID
    (root / "reports").mkdir()
    report.save_as(root / "reports" / "SR000001", enforce_file_format=True)
    stick.skipped += 4

    if hostile:
        # A second DICOMDIR whose entries try to leave the stick; the files themselves are real images.
        sub = root / "hostile"
        fs2 = FileSet()
        for _ in range(3):
            fs2.add(usable_dicom(next(iter(unique_sops.values())), new_uid=True))
        fs2.write(sub)
        ids = dicomdir_ids(sub / "DICOMDIR")
        patch_file_id(sub / "DICOMDIR", ids[0], "..\\..\\..\\..\\..\\..\\etc\\passwd")
        patch_file_id(sub / "DICOMDIR", ids[1], "/etc/passwd")
        for i in ids[:2]:
            stick.images.add(sha(sub.joinpath(*i)))  # still found by the walk, as plain files
        sub.joinpath(*ids[2]).unlink()
        stick.refused += 2
        stick.missing += 1
        stick.skipped += 1  # that DICOMDIR
        # Links off the stick, a link that stays on it, a FIFO, a newline in a name.
        (root / "passwd.dcm").symlink_to("/etc/passwd")
        (root / "rootfs").symlink_to("/")
        (root / "images" / "same.png").symlink_to("x.png")
        os.mkfifo(root / "images" / "pipe.dcm")
        stick.refused += 3
        stick.duplicates += 1
        shutil.copyfile(rasters[0], root / "evil\nname.png")
        stick.duplicates += 1
    return stick


def incoming(spool: Spool) -> dict[str, Path]:
    return {sha(p): p for p in (spool.root / "incoming").iterdir()}


def test_imports_every_image_once_and_refuses_hostile_entries(tmp_path: Path, spool: Spool) -> None:
    stick = build_stick(tmp_path / "stick")
    before = snapshot(stick.root)
    events: list[dict[str, Any]] = []

    report = usb_import.import_tree(stick.root, spool, progress=events.append, progress_every_s=0)

    assert set(incoming(spool)) == stick.images  # exactly the images, byte for byte
    assert report.imported == len(stick.images)
    assert report.duplicates == stick.duplicates
    assert len(report.refused) == stick.refused, report.refused
    assert len(report.skipped) == stick.skipped, report.skipped
    assert len(report.missing) == stick.missing
    reasons = {r.path: r.reason for r in report.refused}
    assert reasons["passwd.dcm"] == reasons["rootfs"] == "symlink points outside the stick"
    assert reasons["images/pipe.dcm"] == "not a regular file"
    assert sum(k.startswith("DICOMDIR:") for k in reasons) == 2
    assert snapshot(stick.root) == before  # nothing written, moved or deleted on the stick
    assert events[0]["state"] == "started" and events[-1]["state"] == "done"
    assert events[-1]["imported"] == report.imported
    assert [e for e in events if e["state"] == "progress"]
    # Counts, never the stick's paths (folder names there carry patients' names and numbers).
    assert events[-1]["refused_by_reason"]["symlink points outside the stick"] == 2
    assert sum(events[-1]["refused_by_reason"].values()) == stick.refused
    published = json.dumps(events)
    assert not [path for path in reasons if path.split(":")[-1] in published]


def test_a_second_import_of_the_same_stick_adds_nothing(tmp_path: Path, spool: Spool) -> None:
    stick = build_stick(tmp_path / "stick", hostile=False)
    first = usb_import.import_tree(stick.root, spool)
    again = usb_import.import_tree(stick.root, spool)
    assert first.imported == len(stick.images) and again.imported == 0
    assert again.duplicates == first.imported + first.duplicates
    assert len(incoming(spool)) == len(stick.images)


def test_an_unmounted_target_is_a_plain_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not mounted after 0\.2 s"):
        usb_import.resolve_mountpoint(tmp_path, wait_s=0.2, poll_s=0.05)
    with pytest.raises(UserError, match="does not exist"):
        usb_import.resolve_mountpoint(tmp_path / "nowhere")
    assert usb_import.resolve_mountpoint(tmp_path) == tmp_path


MKFS = {"vfat": ["mkfs.vfat", "-n", "XRAYS"], "ext4": ["mkfs.ext4", "-q", "-L", "XRAYS"]}


@pytest.fixture(params=sorted(MKFS))
def stick_image(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Stick]]:
    """A real file system image (FAT as most sticks, ext4), filled, then mounted read-only like
    systemd-mount does; skipped where this kernel or container cannot loop-mount it."""
    mkfs = MKFS[request.param]
    if os.geteuid() != 0 or shutil.which(mkfs[0]) is None or shutil.which("losetup") is None:
        pytest.skip(f"needs root, {mkfs[0]} and loop devices")
    stick = build_stick(tmp_path / "content", hostile=False)
    image, mnt = tmp_path / "stick.img", tmp_path / "mnt"
    mnt.mkdir()
    with image.open("wb") as fh:
        fh.truncate(32 * 1024 * 1024)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    rw = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if rw.returncode != 0:
        pytest.skip(f"loop mount not possible here: {rw.stderr.strip()}")
    try:
        shutil.copytree(stick.root, mnt, dirs_exist_ok=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["mount", "-o", "loop,ro,nosuid,nodev,noexec", str(image), str(mnt)], check=True)
    try:
        yield mnt, stick
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_read_only_file_system_image(stick_image: tuple[Path, Stick], spool: Spool) -> None:
    mnt, stick = stick_image
    assert usb_import.resolve_mountpoint(mnt, wait_s=1) == mnt  # it is a mount point
    report = usb_import.import_tree(mnt, spool)
    assert set(incoming(spool)) == stick.images
    assert report.duplicates == stick.duplicates and report.refused == []


def test_cli_reports_progress_and_count_over_mqtt(
    tmp_path: Path, broker_factory: Callable[..., Broker], subscriber_factory: Callable[..., Subscriber]
) -> None:
    broker = broker_factory()
    stick = build_stick(tmp_path / "stick", hostile=False)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device": {"site": "ward7", "device_id": "cart-3"},
                "ingest": {"spool": str(tmp_path / "spool")},
                "journal": {"path": str(tmp_path / "appliance.sqlite3")},  # the daemon's database
                "mqtt": {"host": broker.host, "port": broker.port},
                "privacy": {"salt_file": str(tmp_path / "salt")},
            }
        )
    )
    topic = "cxr/ward7/cart-3/usb_import"
    sub = subscriber_factory(topic, broker=broker)
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "usb-import", "--config", str(config), str(stick.root)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["imported"] == len(stick.images)
    events = [m.json() for m in sub.wait_count(topic, 2)]
    assert events[0]["state"] == "started"
    assert events[-1]["state"] == "done" and events[-1]["imported"] == len(stick.images)
    assert "USB import" in proc.stderr  # and the log says it too


def test_main_without_broker_still_imports(tmp_path: Path) -> None:
    """The broker being down must not stop an import: progress then only goes to the log."""
    stick = build_stick(tmp_path / "stick", hostile=False)
    cfg = AppConfig(
        ingest=IngestConfig(spool=tmp_path / "spool"),
        journal=JournalConfig(path=tmp_path / "appliance.sqlite3"),
        mqtt=MqttConfig(host="127.0.0.1", port=1),
        privacy=PrivacyConfig(salt_file=tmp_path / "salt"),
    )
    assert usb_import.main(argparse.Namespace(mount=stick.root), cfg) == 0
    assert len(list((tmp_path / "spool" / "incoming").iterdir())) == len(stick.images)
