"""Where the real chest X-rays live (../shared/data/cxr, or $CXR_DATA); never copied into the repo."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cxr_data() -> Path:
    root = Path(os.environ.get("CXR_DATA", REPO.parent / "shared" / "data" / "cxr"))
    if not (root / "metadata.csv").is_file():
        pytest.fail(f"real chest X-ray data not found at {root} (set CXR_DATA); the tests need it")
    return root


def rows(**where: str) -> list[dict[str, str]]:
    with (cxr_data() / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if all(row.get(k) == v for k, v in where.items())]


def first(**where: str) -> Path:
    return cxr_data() / rows(**where)[0]["file"]


def real_dicoms() -> list[Path]:
    return sorted((cxr_data() / "dicom").glob("*.dcm"))


def dicom_with(source: Path, target: Path, change: dict[str, object]) -> Path:
    """A copy of a real DICOM with some tags changed (None: the element removed), written to target."""
    import pydicom

    ds = pydicom.dcmread(source)
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target
