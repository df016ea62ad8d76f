"""Cardiothoracic ratio from the lung and heart masks: widest heart over widest thorax.

Both widths are horizontal extents in the same (aspect-preserving) coordinates, so the ratio does not
depend on the image size. The thorax is taken as the outer edges of the two lungs, the usual proxy for
the internal thoracic diameter on a frontal radiograph. Extents use the 1st/99th percentile of the mask
columns so a few stray pixels cannot widen them. The ratio is the same for an image and its mirror.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from appliance.interpret.extent import line_counts, percentiles

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


@functools.lru_cache(maxsize=16)
def _taps(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps from n samples to size (pixel centres aligned): the two source indices and their
    weights for each output position. Read-only: shared by every call through the cache."""
    position = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    first = np.floor(position).astype(np.intp)
    second = np.minimum(first + 1, n - 1)
    fraction = position - first
    taps = (first, second, 1 - fraction, fraction)
    for array in taps:
        array.flags.writeable = False
    return taps


def _upsample(probability: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a (h, w) map to (size, size) in numpy: sub-pixel edges from a 64-px mask.

    Separable: columns on the small (h, size) array, then rows, each a weighted sum of two taps, in
    float64 and in the same order as the direct 2-D formula, so the values are the same bit for bit.
    Not as dense matrix products (Wr @ P @ Wc.T): OpenBLAS runs products this size on several threads,
    which doubled the CPU time for a shorter wall time."""
    h, w = probability.shape
    r0, r1, r0_weight, r1_weight = _taps(h, size)
    c0, c1, c0_weight, c1_weight = _taps(w, size)
    across = np.take(probability, c0, axis=1) * c0_weight
    across += np.take(probability, c1, axis=1) * c1_weight
    result = np.take(across, r0, axis=0)
    result *= r0_weight[:, None]
    lower = np.take(across, r1, axis=0)
    lower *= r1_weight[:, None]
    result += lower
    return result


def _extent(mask: np.ndarray) -> tuple[float, float] | None:
    counts = line_counts(mask, axis=0)
    if int(counts.sum()) < MIN_PIXELS:
        return None
    extent = percentiles(counts, (1.0, 99.0))
    if extent is None:
        return None
    return float(extent[0]), float(extent[1])


def heart_and_thorax_widths(
    lung_probability: np.ndarray, heart_probability: np.ndarray
) -> tuple[float, float] | None:
    """(heart width, thorax width) in working pixels, before the ratio's plausibility check; None when
    either mask is missing or the heart is not between the lungs."""
    lungs = _upsample(lung_probability.astype(np.float32), WORK_SIZE) >= MASK_THRESHOLD
    heart = _upsample(heart_probability.astype(np.float32), WORK_SIZE) >= MASK_THRESHOLD
    thorax, cardiac = _extent(lungs), _extent(heart)
    if thorax is None or cardiac is None:
        return None
    thorax_width, heart_width = thorax[1] - thorax[0], cardiac[1] - cardiac[0]
    centre = (cardiac[0] + cardiac[1]) / 2
    if thorax_width <= 0 or not thorax[0] < centre < thorax[1]:
        return None
    return heart_width, thorax_width


def cardiothoracic_ratio(
    lung_probability: np.ndarray, heart_probability: np.ndarray
) -> Cardiothoracic | None:
    """None when either mask is missing or implausible (heart not between the lungs)."""
    widths = heart_and_thorax_widths(lung_probability, heart_probability)
    if widths is None:
        return None
    heart_width, thorax_width = widths
    if not PLAUSIBLE[0] <= heart_width / thorax_width <= PLAUSIBLE[1]:
        return None
    return Cardiothoracic(
        ratio=heart_width / thorax_width,
        heart_width=heart_width / WORK_SIZE,
        thorax_width=thorax_width / WORK_SIZE,
    )
