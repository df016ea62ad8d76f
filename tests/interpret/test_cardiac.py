"""Cardiothoracic ratio from masks: synthetic shapes, the real JSRT reference masks, and mirroring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from appliance.interpret.cardiac import (
    MASK_THRESHOLD,
    MIN_PIXELS,
    WORK_SIZE,
    _extent,
    _taps,
    _upsample,
    cardiothoracic_ratio,
)
from appliance.interpret.zones import lung_zones
from testsupport.data import cxr_data, rows


def masks(heart_cols: tuple[int, int], size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    lungs = np.zeros((size, size), np.float32)
    lungs[10:54, 8:28] = 1.0
    lungs[10:54, 36:56] = 1.0  # thorax: columns 8..55 -> 48 px wide
    heart = np.zeros((size, size), np.float32)
    heart[30:50, heart_cols[0] : heart_cols[1]] = 1.0
    return lungs, heart


def test_ratio_is_heart_width_over_thorax_width() -> None:
    lungs, heart = masks((20, 44))  # 24 px heart
    measured = cardiothoracic_ratio(lungs, heart)
    assert measured is not None
    assert measured.ratio == pytest.approx(24 / 48, abs=0.03)


def test_mirroring_keeps_the_ratio() -> None:
    lungs, heart = masks((24, 46))
    plain = cardiothoracic_ratio(lungs, heart)
    mirrored = cardiothoracic_ratio(lungs[:, ::-1].copy(), heart[:, ::-1].copy())
    assert plain is not None and mirrored is not None
    assert mirrored.ratio == pytest.approx(plain.ratio, abs=0.01)


def test_missing_or_implausible_masks_give_no_ratio() -> None:
    lungs, heart = masks((20, 44))
    assert cardiothoracic_ratio(lungs, np.zeros_like(heart)) is None
    assert cardiothoracic_ratio(np.zeros_like(lungs), heart) is None
    outside = np.zeros_like(heart)
    outside[30:50, 58:63] = 1.0  # a "heart" beside the thorax, not between the lungs
    assert cardiothoracic_ratio(lungs, outside) is None


def test_reference_masks_give_plausible_ratios() -> None:
    """The SCR masks of JSRT (adult PA films): ratios in the physiological range, about 0.4-0.6."""
    found = [r for r in rows(source="jsrt") if r["heart_mask_file"]][:20]
    ratios = []
    for row in found:
        with (
            Image.open(cxr_data() / row["mask_file"]) as lung,
            Image.open(cxr_data() / row["heart_mask_file"]) as heart,
        ):
            measured = cardiothoracic_ratio(
                np.asarray(lung.convert("L"), np.float32) / 255,
                np.asarray(heart.convert("L"), np.float32) / 255,
            )
        assert measured is not None, row["file"]
        ratios.append(measured.ratio)
    assert 0.35 < float(np.median(ratios)) < 0.6
    assert all(0.25 < r < 0.8 for r in ratios)


def test_zones_split_at_the_lungs_midline_not_the_images() -> None:
    """Lungs off-centre in the picture: the split still falls between them, so each side is one lung."""
    lungs = np.zeros((64, 64), np.float32)
    lungs[10:54, 2:18] = 1.0
    lungs[10:54, 24:40] = 1.0  # both lungs in the left two thirds of the image
    heat = np.zeros((64, 64), np.float32)
    heat[40:54, 24:40] = 1.0  # the patient's left lower lung
    zones = lung_zones(heat, lungs, 0.5, 0.2)
    positive = {(z.side, z.level) for z in zones if z.positive}
    assert positive == {("left", "lower")}
    mirrored = lung_zones(heat[:, ::-1].copy(), lungs[:, ::-1].copy(), 0.5, 0.2)
    assert {(z.side, z.level) for z in mirrored if z.positive} == {("right", "lower")}


def reference_upsample(probability: np.ndarray, size: int) -> np.ndarray:
    """The direct 2-D bilinear formula the separable version replaced."""
    h, w = probability.shape
    rows = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    cols = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = probability[r0][:, c0] * (1 - fc) + probability[r0][:, c1] * fc
    bottom = probability[r1][:, c0] * (1 - fc) + probability[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def reference_extent(mask: np.ndarray) -> tuple[float, float] | None:
    columns = np.nonzero(mask)[1]
    if columns.size < MIN_PIXELS:
        return None
    low, high = np.percentile(columns, [1.0, 99.0])
    return float(low), float(high)


@pytest.mark.parametrize(
    "shape", [(64, 64), (52, 64), (64, 50), (1, 64), (64, 1), (1, 1), (2, 3), (7, 300), (300, 200)]
)
@pytest.mark.parametrize("size", [256, 17, 1])
def test_upsample_equals_the_direct_formula(shape: tuple[int, int], size: int) -> None:
    rng = np.random.default_rng(sum(shape) * 1000 + size)
    probability = rng.random(shape).astype(np.float32)
    got = _upsample(probability, size)
    assert got.shape == (size, size) and got.dtype == np.float64
    # Same operations in the same order: equal bit for bit, so the thresholded masks are too.
    np.testing.assert_array_equal(got, reference_upsample(probability, size))


def test_upsample_of_binary_masks_keeps_the_thresholded_mask() -> None:
    """0/1 masks (the JSRT references) put many values exactly on the threshold."""
    rng = np.random.default_rng(7)
    for shape in [(64, 64), (52, 64), (333, 250)]:
        mask = (rng.random(shape) < 0.5).astype(np.float32)
        np.testing.assert_array_equal(
            _upsample(mask, WORK_SIZE) >= MASK_THRESHOLD,
            reference_upsample(mask, WORK_SIZE) >= MASK_THRESHOLD,
        )


def test_interpolation_taps_are_cached_read_only() -> None:
    taps = _taps(52, WORK_SIZE)
    assert _taps(52, WORK_SIZE) is taps
    for array in taps:
        with pytest.raises(ValueError):
            array[0] = 0
    np.testing.assert_allclose(taps[2] + taps[3], 1.0)  # the two weights of each output position


def test_extent_equals_nonzero_percentiles() -> None:
    rng = np.random.default_rng(8)
    for _ in range(300):
        mask = rng.random((WORK_SIZE, WORK_SIZE)) < rng.random() ** 6
        assert _extent(mask) == reference_extent(mask)
    few = np.zeros((WORK_SIZE, WORK_SIZE), bool)
    few.flat[: MIN_PIXELS - 1] = True
    assert _extent(few) is None
    few.flat[MIN_PIXELS - 1] = True
    last = MIN_PIXELS - 1  # columns 0..last of the first row
    assert _extent(few) == reference_extent(few) == pytest.approx((0.01 * last, 0.99 * last))


def blob(h: int, cx: float, rx: float) -> np.ndarray:
    """A soft vertical ellipse in an (h, 64) map, centred at column cx, half-width rx."""
    y, x = np.mgrid[0:h, 0:64]
    return np.exp(-(((y - h / 2) / (h / 3)) ** 2 + ((x - cx) / rx) ** 2)).astype(np.float32)


def test_ratio_equals_the_former_implementation_on_random_masks() -> None:
    """End to end: random lung pairs and hearts, ratio or refusal exactly as before."""
    rng = np.random.default_rng(9)
    measured = 0
    for _ in range(100):
        h = int(rng.integers(40, 70))
        lungs = blob(h, rng.uniform(12, 26), rng.uniform(4, 10)) + blob(
            h, rng.uniform(38, 52), rng.uniform(4, 10)
        )
        heart = blob(h, rng.uniform(24, 40), rng.uniform(3, 12)) + rng.normal(0, 0.1, (h, 64)).astype(
            np.float32
        )
        got = cardiothoracic_ratio(lungs, heart)
        thorax = reference_extent(reference_upsample(lungs, WORK_SIZE) >= MASK_THRESHOLD)
        cardiac = reference_extent(reference_upsample(heart, WORK_SIZE) >= MASK_THRESHOLD)
        assert thorax is not None and cardiac is not None
        expected = (cardiac[1] - cardiac[0]) / (thorax[1] - thorax[0])
        if got is None:
            centre = (cardiac[0] + cardiac[1]) / 2
            assert not (0.25 <= expected <= 0.80 and thorax[0] < centre < thorax[1])
        else:
            measured += 1
            assert got.ratio == expected
            assert got.thorax_width == (thorax[1] - thorax[0]) / WORK_SIZE
    assert measured > 50
