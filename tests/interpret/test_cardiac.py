"""Cardiothoracic ratio from masks: synthetic shapes, the real JSRT reference masks, and mirroring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from appliance.interpret.cardiac import cardiothoracic_ratio
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
