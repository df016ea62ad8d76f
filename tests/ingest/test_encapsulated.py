"""The first frame read straight from the file (appliance/ingest/encapsulated.py) is the frame pydicom
reads, and anything but one fragment of one frame is left to pydicom."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate

from appliance.ingest import encapsulated
from appliance.ingest.dicom import _parse
from tests.ingest.conftest import JPEG_BASELINE, real


def parsed(path: Path) -> pydicom.Dataset:
    return _parse(path, max_inflated=1 << 30)  # as the reader parses: Pixel Data left on disk


def test_one_fragment_is_read_from_the_file_and_equals_pydicoms_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = real(JPEG_BASELINE)
    expected = pydicom.encaps.get_frame(pydicom.dcmread(path).PixelData, 0, number_of_frames=1)
    assert encapsulated._lone_fragment(path, parsed(path)) == expected
    monkeypatch.setattr(pydicom.encaps, "get_frame", lambda *a, **k: pytest.fail("pydicom was asked"))
    assert encapsulated.first_frame(path, parsed(path), 1) == expected


def test_several_fragments_or_a_file_cut_short_are_left_to_pydicom(tmp_path: Path) -> None:
    ds = pydicom.dcmread(real(JPEG_BASELINE))
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame], fragments_per_frame=3)
    split = tmp_path / "split.dcm"
    ds.save_as(split)
    assert encapsulated._lone_fragment(split, parsed(split)) is None
    assert encapsulated.first_frame(split, parsed(split), 1) == frame  # pydicom joins the fragments
    # Cut short after the header was parsed (a stick pulled while reading): no frame from a short read.
    whole = real(JPEG_BASELINE).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole)
    header = parsed(cut)
    cut.write_bytes(whole[: len(whole) - 5000])
    assert encapsulated._lone_fragment(cut, header) is None
    with pytest.raises(Exception):  # noqa: B017 - pydicom's own error for a value cut short
        encapsulated.first_frame(cut, header, 1)
