"""Reduced-resolution reading (what the model needs, not what the detector stored) matches the full path.

Cart-sized 12-16 bit DICOMs are made from a real image by tools/quality/gen_cart_dicoms.py (smaller here, to keep
the test fast); the reference is the full-size decode, preprocessed exactly as the Analyzer does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.ingest import read_image
from appliance.manifest import InputSpec
from appliance.preprocess import preprocess
from testsupport import data
from tools.quality.gen_cart_dicoms import frontal_sources, load_grey, write_cart_dicom

SPEC = InputSpec.model_validate(
    {
        "name": "x",
        "height": 256,
        "width": 256,
        "channels": 1,
        "aspect": "letterbox",
        "intensity": {"range": [0.0, 1.0], "mean": [0.0], "std": [1.0]},
    }
)


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return load_grey(data.first(source="cohen", view="PA", modality="X-ray"))


def _tensor(path: Path, target_size: int | None) -> np.ndarray:
    tensor, _ = preprocess(read_image(path, target_size=target_size).pixels, SPEC)
    return tensor[0]


@pytest.mark.parametrize(
    ("syntax", "seed"), [("uncompressed", 0), ("uncompressed", 2), ("j2k", 0), ("j2k", 1)]
)
def test_reduced_read_matches_the_full_size_path(
    tmp_path: Path, source: np.ndarray, syntax: str, seed: int
) -> None:
    path = write_cart_dicom(source, tmp_path / f"{syntax}.dcm", syntax, seed=seed, size=(1500, 1250))
    bits = int(pydicom.dcmread(path, stop_before_pixels=True).BitsStored)
    small = read_image(path, target_size=256)
    assert small.scale > 1 and min(small.pixels.shape) >= 256
    diff = np.abs(_tensor(path, 256) - _tensor(path, None))
    # A smoothing-sized difference (pixel noise averaged over another footprint), never a scale error:
    # a 12-bit JPEG 2000 image read as 16-bit values would put every pixel off by tens of percent.
    assert diff.mean() < 0.02, (bits, diff.mean())
    assert np.percentile(diff, 50) < 0.01


def test_auto_window_uses_the_extremes_of_the_full_image(tmp_path: Path, source: np.ndarray) -> None:
    path = write_cart_dicom(source, tmp_path / "plain.dcm", "uncompressed", seed=1, size=(1500, 1250))
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(path)
    full, small = _tensor(path, None), _tensor(path, 256)
    # Stretching block means by their own (noise-free) extremes would brighten the whole image.
    assert abs(float(small.mean()) - float(full.mean())) < 0.005
    assert np.abs(small - full).mean() < 0.02


def test_jpeg_lossless_direct_decode_is_exact(tmp_path: Path, source: np.ndarray) -> None:
    """GDCM's region reader (the fast path) gives exactly the stored values of the uncompressed twin."""
    plain = write_cart_dicom(source, tmp_path / "plain.dcm", "uncompressed", seed=1, size=(1500, 1250))
    packed = write_cart_dicom(source, tmp_path / "packed.dcm", "jpeg_lossless", seed=1, size=(1500, 1250))
    assert read_image(packed).meta.transfer_syntax == "1.2.840.10008.1.2.4.70"
    np.testing.assert_array_equal(read_image(packed).pixels, read_image(plain).pixels)
    np.testing.assert_array_equal(
        read_image(packed, target_size=256).pixels, read_image(plain, target_size=256).pixels
    )


def test_jpeg2000_reduction_where_pillow_and_openjpeg_round_apart(tmp_path: Path) -> None:
    # 2467 x 3000: by 8 OpenJPEG makes 309 rows, Pillow's own rounding expects 308 (the decode failed and the
    # reader fell back to a reduction by 4, 3x slower). The reader must get OpenJPEG's 309 x 375.
    image = load_grey(frontal_sources(data.cxr_data(), 1)[0])
    path = write_cart_dicom(image, tmp_path / "j2k.dcm", "j2k", seed=0)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (2467, 3000)
    small = read_image(path, target_size=256)
    assert small.scale == 8.0 and small.pixels.shape == (309, 375)
    full = read_image(path)
    pooled = full.pixels[:2464, :].reshape(308, 8, 375, 8).mean(axis=(1, 3))
    assert np.abs(small.pixels[:308] - pooled).mean() < 0.02
