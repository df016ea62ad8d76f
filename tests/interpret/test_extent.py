"""Percentiles from per-line counts against np.percentile over the mask's pixel indices, and the
thumbnail's thorax box against its former nonzero/percentile implementation."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.interpret.extent import line_counts, percentiles
from appliance.interpret.thumbnail import PLAUSIBLE_AREA, SIDE_SHARE, box_with_margin, thorax_box
from appliance.result import ThoraxBox


def reference_box(lungs: np.ndarray, threshold: float) -> ThoraxBox | str:
    """thorax_box as it was: one index per mask pixel, np.percentile over them (area, side share, bounds)."""
    mask = lungs >= threshold
    h, w = mask.shape
    area = float(mask.mean()) if mask.size else 0.0
    if not PLAUSIBLE_AREA[0] <= area <= PLAUSIBLE_AREA[1]:
        return f"lung mask covers {area:.0%} of the image (plausible {PLAUSIBLE_AREA[0]:.0%}-{PLAUSIBLE_AREA[1]:.0%})"
    rows, cols = np.nonzero(mask)
    left_share = float((cols < w / 2).mean())
    if not SIDE_SHARE[0] <= left_share <= SIDE_SHARE[1]:
        return f"lung mask is {left_share:.0%} on one side of the image: not two lungs"
    # The box from its bounds is shared: what changed is how area, side share and bounds are computed.
    return box_with_margin(np.percentile(rows, [1.0, 99.0]), np.percentile(cols, [1.0, 99.0]), (h, w))


def random_masks(seed: int, count: int) -> list[np.ndarray]:
    """Shapes from one pixel to 256 px, densities from a few pixels to nearly full."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, 257, size=2))
        masks.append(rng.random((h, w)) < rng.random() ** 4)
    return masks


def check_against_numpy(mask: np.ndarray, q: list[float]) -> None:
    rows, cols = np.nonzero(mask)
    for axis, indices in ((0, cols), (1, rows)):
        got = percentiles(line_counts(mask, axis), q)
        if indices.size == 0:
            assert got is None
        else:
            assert got is not None
            # Bit for bit, not just close: the box and the ratio are rounded afterwards.
            np.testing.assert_array_equal(got, np.percentile(indices, q))


def test_line_counts_are_the_pixels_per_column_and_row() -> None:
    for mask in random_masks(seed=1, count=50):
        np.testing.assert_array_equal(line_counts(mask, 0), np.count_nonzero(mask, axis=0))
        np.testing.assert_array_equal(line_counts(mask, 1), np.count_nonzero(mask, axis=1))


def test_percentiles_equal_numpy_on_random_masks() -> None:
    for mask in random_masks(seed=2, count=400):
        check_against_numpy(mask, [1.0, 99.0])


@pytest.mark.parametrize("q", [[0.0, 100.0], [50.0], [25.0, 33.3, 66.7, 99.9]])
def test_percentiles_equal_numpy_for_other_levels(q: list[float]) -> None:
    for mask in random_masks(seed=3, count=100):
        check_against_numpy(mask, q)


def test_percentiles_of_edge_masks() -> None:
    empty = np.zeros((5, 7), bool)
    assert percentiles(line_counts(empty, 0), [1.0, 99.0]) is None
    assert percentiles(np.zeros(0, np.int64), [1.0, 99.0]) is None
    one = empty.copy()
    one[3, 4] = True
    two = one.copy()
    two[0, 6] = True
    full = np.ones((9, 4), bool)
    for mask in (one, two, full, np.ones((1, 1), bool), np.ones((1, 30), bool), np.ones((30, 1), bool)):
        check_against_numpy(mask, [1.0, 99.0])
    single = percentiles(line_counts(one, 0), [1.0, 99.0])
    assert single is not None and single.tolist() == [4.0, 4.0]
    pair = percentiles(line_counts(two, 0), [1.0, 99.0])
    assert pair is not None and pair.tolist() == pytest.approx([4.02, 5.98])


def lung_maps(seed: int, count: int) -> list[np.ndarray]:
    """Two soft blobs per map (left and right lung) at random places and sizes, plus noise."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(16, 97, size=2))
        y, x = np.mgrid[0:h, 0:w]
        probability = np.zeros((h, w), np.float32)
        for centre_x in rng.uniform(0.1, 0.9, size=2):
            cy, cx = rng.uniform(0.3, 0.7) * h, centre_x * w
            ry, rx = rng.uniform(0.1, 0.45) * h, rng.uniform(0.05, 0.3) * w
            probability += np.exp(-(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)).astype(np.float32)
        probability += rng.normal(0, 0.15, (h, w)).astype(np.float32)
        maps.append(probability)
    return maps


def test_thorax_box_equals_the_nonzero_percentile_version() -> None:
    maps = lung_maps(seed=4, count=300)
    outcomes = {"box": 0, "refused": 0}
    for probability in maps:
        for threshold in (0.3, 0.5, 0.7):
            got, expected = thorax_box(probability, threshold), reference_box(probability, threshold)
            assert got == expected
            outcomes["box" if isinstance(got, ThoraxBox) else "refused"] += 1
    # Both paths exercised, not only the refusals.
    assert outcomes["box"] > 100 and outcomes["refused"] > 100


def test_thorax_box_of_edge_masks() -> None:
    for lungs in (np.zeros((0, 0), np.float32), np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32)):
        assert thorax_box(lungs, 0.5) == reference_box(lungs, 0.5)
    # Odd width: the middle column (10 < 21 / 2) is left of the midline, so this mask is all on one side.
    one_sided = np.zeros((20, 21), np.float32)
    one_sided[4:16, 3:11] = 1.0
    assert thorax_box(one_sided, 0.5) == reference_box(one_sided, 0.5)
    assert thorax_box(one_sided, 0.5) == "lung mask is 100% on one side of the image: not two lungs"
