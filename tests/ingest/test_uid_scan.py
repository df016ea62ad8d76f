"""The UIDs read with struct (appliance/ingest/uid_scan.py): the same as pydicom's wherever the scan answers,
and no answer (pydicom decides) for every layout it does not read."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from appliance.ingest.identity import dicom_uid
from appliance.ingest.uid_scan import scan_uids
from tests.ingest.conftest import JPEG_BASELINE, real
from testsupport.data import dicom_with, real_dicoms

DX = UID("1.2.840.10008.5.1.4.1.1.1.1")


def pydicom_uids(path: Path) -> tuple[str | None, str | None]:
    """What the intake read before the scan: the File Meta's SOP class and dicom_uid's pydicom parse."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SOPInstanceUID"])
    sop_class = read_file_meta_info(path).get("MediaStorageSOPClassUID")
    return (str(sop_class) if sop_class else None), (str(ds.get("SOPInstanceUID", "") or "").strip() or None)


def small_dicom(path: Path, syntax: UID = ExplicitVRLittleEndian, **tags: object) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_real_files_read_the_same_as_pydicom(tmp_path: Path) -> None:
    files = [*real_dicoms(), small_dicom(tmp_path / "explicit.dcm")]
    answered = 0
    for path in files:
        scanned = scan_uids(path)
        if scanned is not None:
            answered += 1
            assert (scanned.sop_class, scanned.sop_instance) == pydicom_uids(path), path.name
        assert dicom_uid(path) == pydicom_uids(path)[1], path.name
    assert answered >= 3  # the fast path is what cart files take: it must answer for them


_INSTANCE_UI = b"\x08\x00\x18\x00UI"  # (0008,0018) of the dataset, explicit VR


def with_instance_value(path: Path, value: bytes) -> Path:
    """The dataset's SOP Instance UID element given `value`, padded with NULs to its old length."""
    raw = bytearray(path.read_bytes())
    at = raw.index(_INSTANCE_UI) + 8
    length = int.from_bytes(raw[at - 2 : at], "little")
    assert len(value) <= length
    raw[at : at + length] = value.ljust(length, b"\x00")
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("value", [b"1.2.3", b"1.2.3\x00 ", b" 1.2.3 ", b"1.2.3  \x00"], ids=repr)
def test_padding_is_taken_off_as_pydicom_does(tmp_path: Path, value: bytes) -> None:
    path = with_instance_value(small_dicom(tmp_path / "padded.dcm"), value)
    scanned = scan_uids(path)
    assert scanned is not None and scanned.sop_instance == "1.2.3" == pydicom_uids(path)[1]


def test_another_vr_or_a_repeated_uid_is_left_to_pydicom(tmp_path: Path) -> None:
    other_vr = small_dicom(tmp_path / "lo.dcm")
    raw = other_vr.read_bytes()
    other_vr.write_bytes(raw.replace(_INSTANCE_UI, b"\x08\x00\x18\x00LO"))
    repeated = tmp_path / "repeated.dcm"
    at = raw.index(_INSTANCE_UI)
    end = at + 8 + int.from_bytes(raw[at + 6 : at + 8], "little")
    second = b"1.2.3".ljust(end - at - 8, b"\x00")
    repeated.write_bytes(raw[:end] + raw[at : at + 8] + second + raw[end:])
    for path in (other_vr, repeated):
        assert scan_uids(path) is None, path.name
        assert dicom_uid(path) == pydicom_uids(path)[1], path.name
    assert dicom_uid(repeated) == "1.2.3"  # pydicom's reading: the last one


def test_a_sop_class_pydicom_would_not_name_is_left_to_it(tmp_path: Path) -> None:
    path = small_dicom(tmp_path / "class.dcm")
    raw = path.read_bytes()
    at = raw.index(b"\x02\x00\x02\x00UI") + 8
    length = int.from_bytes(raw[at - 2 : at], "little")
    path.write_bytes(raw[:at] + b" " + raw[at : at + length - 1] + raw[at + length :])  # a leading space
    assert scan_uids(path) is None


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian], ids=str
)
def test_other_syntaxes_are_left_to_pydicom(tmp_path: Path, syntax: UID) -> None:
    path = small_dicom(tmp_path / "other.dcm", syntax)
    assert scan_uids(path) is None
    assert dicom_uid(path) == pydicom_uids(path)[1] is not None


@pytest.mark.parametrize(
    "uid",
    ["1.2.3/blake3:" + "0" * 16, "1.2.3\\1.2.4", "1.2.3#x", "01.2." + "3" * 70],
    ids=["slash", "two values", "hash", "too long"],
)
def test_a_value_that_is_no_plain_uid_is_left_to_pydicom(tmp_path: Path, uid: str) -> None:
    path = dicom_with(real(JPEG_BASELINE), tmp_path / "forged.dcm", {"SOPInstanceUID": uid})
    assert scan_uids(path) is None
    assert dicom_uid(path) == pydicom_uids(path)[1]


def test_layouts_it_does_not_read_answer_none(tmp_path: Path) -> None:
    explicit = small_dicom(tmp_path / "explicit.dcm").read_bytes()
    bare = tmp_path / "bare.dcm"  # no preamble: pydicom's force=True reads these
    bare.write_bytes(explicit[explicit.index(b"\x08\x00\x05\x00") :])
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(explicit[:150])
    sequence = small_dicom(
        tmp_path / "sequence.dcm", ReferencedImageSequence=[Dataset()], InstanceCreationDate="20260101"
    )
    no_uid = tmp_path / "no-uid.dcm"
    ds = pydicom.dcmread(small_dicom(tmp_path / "base.dcm"))
    del ds.SOPInstanceUID
    ds.save_as(no_uid)
    sequence_first = small_dicom(tmp_path / "sequence-first.dcm", LanguageCodeSequence=[Dataset()])
    for path in (bare, truncated, no_uid, sequence_first):
        assert scan_uids(path) is None, path.name
    assert dicom_uid(sequence_first) == pydicom_uids(sequence_first)[1] is not None
    # A sequence after (0008,0018) does not matter; the scan stops there.
    assert scan_uids(sequence) is not None
