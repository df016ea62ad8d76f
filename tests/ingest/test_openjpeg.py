"""JPEG 2000 through OpenJPEG by ctypes (appliance/ingest/openjpeg.py): the same stored values as Pillow's
decode of the same codestream at the same level, None (never a crash) for what OpenJPEG refuses, and the
reader's Pillow fallback when there is no library to call."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from appliance.ingest import openjpeg, read_image
from appliance.ingest.dicom_pixels import _j2k_precision, _reduce_as_openjpeg_does
from testsupport import data
from tools.quality.gen_cart_dicoms import load_grey, write_cart_dicom

pytestmark = pytest.mark.skipif(
    openjpeg._library() is None, reason="no libopenjp2 to load (Pillow's wheel or the system's)"
)


@pytest.fixture(scope="module")
def codestreams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    source = load_grey(data.first(source="cohen", view="PA", modality="X-ray"))
    folder = tmp_path_factory.mktemp("j2k")
    out = {}
    for syntax, seed in (("j2k", 0), ("j2k", 1), ("j2k_lossy", 2)):
        path = write_cart_dicom(source, folder / f"{syntax}-{seed}.dcm", syntax, seed=seed, size=(1500, 1250))
        ds = pydicom.dcmread(path)
        out[f"{syntax}-{seed}"] = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    return out


def pillow_stored(codestream: bytes, level: int) -> np.ndarray:
    img = Image.open(io.BytesIO(codestream))
    _reduce_as_openjpeg_does(img, level)
    img.load()
    values = np.asarray(img)
    precision = _j2k_precision(codestream)
    assert precision is not None
    if values.dtype == np.uint16 and precision < 16:  # Pillow scales samples up to 16 bits
        values = values >> np.uint16(16 - precision)
    return values


@pytest.mark.parametrize("level", [1, 2, 3])
def test_the_same_stored_values_as_pillow(codestreams: dict[str, bytes], level: int) -> None:
    for name, codestream in codestreams.items():
        ours = openjpeg.decode_reduced(codestream, level)
        assert ours is not None, name
        expected = pillow_stored(codestream, level)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape, name
        np.testing.assert_array_equal(ours, expected, err_msg=name)


def test_what_openjpeg_refuses_is_none(codestreams: dict[str, bytes]) -> None:
    codestream = next(iter(codestreams.values()))
    assert openjpeg.decode_reduced(b"\xff\x4f\xff\x51" + b"\x00" * 200, 2) is None
    assert openjpeg.decode_reduced(b"not a codestream" * 64, 2) is None
    assert openjpeg.decode_reduced(codestream[:4000], 2) is None  # cut short
    assert openjpeg.decode_reduced(codestream, 30) is None  # more levels than the codestream has


def test_without_the_library_the_reader_decodes_with_pillow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_grey(data.first(source="cohen", view="PA", modality="X-ray"))
    path = write_cart_dicom(source, tmp_path / "j2k.dcm", "j2k", seed=0, size=(1500, 1250))
    through_ctypes = read_image(path, target_size=256)
    monkeypatch.setattr(openjpeg, "_library", lambda: None)
    through_pillow = read_image(path, target_size=256)
    assert through_ctypes.scale == through_pillow.scale == 4.0
    np.testing.assert_array_equal(through_ctypes.pixels, through_pillow.pixels)


def test_doctor_names_the_library_or_warns_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.doctor import check_decoders

    fast = [c for c in check_decoders() if "JPEG 2000 fast path" in c.message]
    assert len(fast) == 1 and fast[0].verdict == "OK" and "libopenjp2" in fast[0].message
    monkeypatch.setattr(openjpeg, "_library", lambda: None)
    fast = [c for c in check_decoders() if "JPEG 2000 fast path" in c.message]
    assert len(fast) == 1 and fast[0].verdict == "WARN"
