"""Inputs for the ingest tests, built from the real files in ../shared/data/cxr (never copied into the repo)."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.filewriter import write_file_meta_info

from testsupport.data import cxr_data, real_dicoms

DICOM_DIR = "dicom"
JPEG_BASELINE = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONOCHROME1 = "Fake_MONOHR1.dcm"
NATIVE_DX = "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"


def real(name: str) -> Path:
    return cxr_data() / DICOM_DIR / name


@pytest.fixture(scope="session")
def dicoms() -> list[Path]:
    found = real_dicoms()
    assert len(found) == 3, found
    return found


@pytest.fixture(scope="session")
def native_pixels() -> np.ndarray:
    """The uncompressed NIH DX as pydicom itself decodes it: the reference for re-encoded copies."""
    return pydicom.dcmread(real(NATIVE_DX)).pixel_array


@pytest.fixture(scope="session")
def real_png() -> Path:
    return cxr_data() / "images" / "txv" / "00000001_000.png"


@pytest.fixture(scope="session")
def real_jpeg() -> Path:
    return cxr_data() / "images" / "txv" / "covid-19-pneumonia-58-prior.jpg"


def copy_to(src: Path, folder: Path, name: str | None = None) -> Path:
    dest = folder / (name or src.name)
    shutil.copyfile(src, dest)
    return dest


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def same_dataset_other_file_meta(src: Path, dest: Path) -> Path:
    """The dataset's bytes as they are, behind a File Meta another program wrote (as a network
    receiver does): the same instance."""
    data = src.read_bytes()
    start = 144 + struct.unpack_from("<I", data, 140)[0]
    meta = pydicom.dcmread(src, stop_before_pixels=True).file_meta
    meta.ImplementationClassUID = pydicom.uid.UID("1.2.826.0.1.3680043.9.9999.1")
    meta.ImplementationVersionName = "OTHER_WRITER"
    head = io.BytesIO()
    head.write(b"\xff" * 128 + b"DICM")
    write_file_meta_info(head, meta)  # type: ignore[arg-type]
    dest.write_bytes(head.getvalue() + data[start:])
    return dest


def corrected(src: Path, dest: Path, *, pixel: bool) -> Path:
    """`src` edited and saved under the same SOPInstanceUID: one pixel, or a tag."""
    ds = pydicom.dcmread(src)
    if pixel:
        data = bytearray(ds.PixelData)
        data[len(data) // 2] ^= 0x01
        ds.PixelData = bytes(data)
    else:
        ds.PatientOrientation = ["L", "F"]  # the unit's correction of a wrong orientation
    ds.save_as(dest)
    assert pydicom.dcmread(dest, stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID
    return dest
