"""Inputs for the ingest tests, built from the real files in ../shared/data/cxr (never copied into the repo)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

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
