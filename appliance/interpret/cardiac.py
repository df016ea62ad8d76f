"""Cardiothoracic ratio from the lung and heart masks: widest heart over widest thorax.

Both widths are horizontal extents in the same (aspect-preserving) coordinates, so the ratio does not
depend on the image size. The thorax is taken as the outer edges of the two lungs, the usual proxy for
the internal thoracic diameter on a frontal radiograph. Extents use the 1st/99th percentile of the mask
columns so a few stray pixels cannot widen them. The ratio is the same for an image and its mirror.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK_THRESHOLD = 0.5
MIN_PIXELS = 40  # at the 256-px working size: below this a mask is not there
# Outside this range the masks, not the heart, are wrong (a merged or missing lung, a heart mask
# spilling over the diaphragm): no ratio rather than a wrong one.
PLAUSIBLE = (0.25, 0.80)
WORK_SIZE = 256


@dataclass(frozen=True)
class Cardiothoracic:
    ratio: float
    heart_width: float  # fraction of the mask width
    thorax_width: float


def _upsample(probability: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a (h, w) map to (size, size) in numpy: sub-pixel edges from a 64-px mask."""
    h, w = probability.shape
    rows = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    cols = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = probability[r0][:, c0] * (1 - fc) + probability[r0][:, c1] * fc
    bottom = probability[r1][:, c0] * (1 - fc) + probability[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def _extent(mask: np.ndarray) -> tuple[float, float] | None:
    columns = np.nonzero(mask)[1]
    if columns.size < MIN_PIXELS:
        return None
    low, high = np.percentile(columns, [1.0, 99.0])
    return float(low), float(high)


def cardiothoracic_ratio(
    lung_probability: np.ndarray, heart_probability: np.ndarray
) -> Cardiothoracic | None:
    """None when either mask is missing or implausible (heart not between the lungs)."""
    lungs = _upsample(lung_probability.astype(np.float32), WORK_SIZE) >= MASK_THRESHOLD
    heart = _upsample(heart_probability.astype(np.float32), WORK_SIZE) >= MASK_THRESHOLD
    thorax, cardiac = _extent(lungs), _extent(heart)
    if thorax is None or cardiac is None:
        return None
    thorax_width, heart_width = thorax[1] - thorax[0], cardiac[1] - cardiac[0]
    centre = (cardiac[0] + cardiac[1]) / 2
    if thorax_width <= 0 or not thorax[0] < centre < thorax[1]:
        return None
    if not PLAUSIBLE[0] <= heart_width / thorax_width <= PLAUSIBLE[1]:
        return None
    return Cardiothoracic(
        ratio=heart_width / thorax_width,
        heart_width=heart_width / WORK_SIZE,
        thorax_width=thorax_width / WORK_SIZE,
    )
