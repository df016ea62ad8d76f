"""Lung zones from the heatmap and the lung mask: upper / middle / lower x right / left.

The image is read as a frontal radiograph in standard orientation: the patient's right lung is on
the image's left. Each lung's rows are cut in thirds; a zone's involvement is the share of its lung
pixels where the heatmap is high.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from appliance.result import Zone

LEVELS: tuple[Literal["upper", "middle", "lower"], ...] = ("upper", "middle", "lower")
HOT = 0.5  # heatmap values are per-image normalised to [0, 1]
MIN_LUNG_PIXELS = 20


def _resize_nearest(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) * values.shape[0] / shape[0]).astype(int), values.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * values.shape[1] / shape[1]).astype(int), values.shape[1] - 1)
    return values[rows][:, cols]


def _midline(lungs: np.ndarray) -> int:
    """The column between the two lungs: the centre of the lung mask's horizontal extent, so an image
    that is not centred (or is mirrored) still splits where the patient's midline is."""
    columns = np.flatnonzero(lungs.any(axis=0))
    if columns.size < 2:
        return lungs.shape[1] // 2
    return (int(columns[0]) + int(columns[-1]) + 1) // 2


def lung_zones(
    heatmap: np.ndarray, lung_probability: np.ndarray | None, lung_threshold: float, min_involvement: float
) -> list[Zone]:
    """Zones for one image; both maps are cropped to the image content already."""
    if lung_probability is None:
        lungs = np.ones_like(heatmap, dtype=bool)  # no mask head: zones of the whole image
    else:
        lungs = _resize_nearest(lung_probability, heatmap.shape) >= lung_threshold
    hot = heatmap >= HOT
    midline = _midline(lungs)
    zones: list[Zone] = []
    side_columns: dict[Literal["right", "left"], slice] = {
        "right": slice(0, midline),
        "left": slice(midline, heatmap.shape[1]),
    }
    for side, cols in side_columns.items():
        side_lung = np.zeros_like(lungs)
        side_lung[:, cols] = lungs[:, cols]
        rows = np.flatnonzero(side_lung.any(axis=1))
        if rows.size == 0 or side_lung.sum() < MIN_LUNG_PIXELS:
            continue
        edges = np.linspace(rows[0], rows[-1] + 1, 4).round().astype(int)
        for level, start, stop in zip(LEVELS, edges[:-1], edges[1:], strict=True):
            zone_lung = side_lung[start:stop]
            lung_pixels = int(zone_lung.sum())
            share = float((hot[start:stop] & zone_lung).sum() / lung_pixels) if lung_pixels else 0.0
            zones.append(
                Zone(side=side, level=level, involvement=round(share, 3), positive=share >= min_involvement)
            )
    return zones


def describe_zones(zones: list[Zone]) -> str | None:
    """'both lower zones and the left middle zone' — None when no zone is positive."""
    positive = [z for z in zones if z.positive]
    if not positive:
        return None
    order = list(reversed(LEVELS))  # lower zones first: where pneumonia usually starts
    sides_at = {level: {z.side for z in positive if z.level == level} for level in order}
    both = [level for level in order if sides_at[level] == {"right", "left"}]
    parts = [f"both {_and(both)} zones"] if both else []
    for side in ("right", "left"):
        levels = [level for level in order if sides_at[level] == {side}]
        if levels:
            parts.append(f"the {side} {_and(levels)} zone{'s' if len(levels) > 1 else ''}")
    return _and(parts)


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# Summed involvement (0-3 per side) by which one side must lead to be called dominant: the mirror
# test judges only images where the zones clearly favour one side.
DOMINANCE_MARGIN = 0.25


def dominant_side(zones: Sequence[Zone], margin: float = DOMINANCE_MARGIN) -> Literal["right", "left"] | None:
    right = sum(z.involvement for z in zones if z.side == "right")
    left = sum(z.involvement for z in zones if z.side == "left")
    if abs(right - left) < margin:
        return None
    return "right" if right > left else "left"
