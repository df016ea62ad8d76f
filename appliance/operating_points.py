"""Operating points and their intervals (numpy only), shared by the runtime and tools/.

The appliance's `recalibrate` command and the training tools choose operating points the same way;
the runtime must not import tools/, so the functions live here and tools/training/metrics.py re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _between(scores: np.ndarray, value: float, above: bool) -> float:
    """Midpoint between `value` and the nearest other score below it (or above it), so that no
    validation image sits exactly on the operating point and rounding noise cannot flip it."""
    others = scores[scores > value] if above else scores[scores < value]
    if len(others) == 0:
        return float(value)
    neighbour = others.min() if above else others.max()
    return float((value + neighbour) / 2)


def threshold_at_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (score >= t) is at least `target`."""
    positives = np.sort(scores[labels.astype(bool)])[::-1]
    if len(positives) == 0:
        return 0.5
    needed = int(np.ceil(target * len(positives)))
    return _between(scores, float(positives[max(needed, 1) - 1]), above=False)


def threshold_at_specificity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Lowest threshold whose specificity (negatives below t) is at least `target`."""
    negatives = np.sort(scores[~labels.astype(bool)])
    if len(negatives) == 0:
        return 0.5
    allowed = int(np.floor((1 - target) * len(negatives)))  # negatives that may score >= t
    return _between(scores, float(negatives[len(negatives) - 1 - allowed]), above=True)


def sensitivity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float | None:
    """Share of positives with score >= threshold; None without positives."""
    positive = np.asarray(labels).astype(bool)
    return float((scores[positive] >= threshold).mean()) if positive.any() else None


def specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float | None:
    """Share of negatives with score < threshold; None without negatives."""
    negative = ~np.asarray(labels).astype(bool)
    return float((scores[negative] < threshold).mean()) if negative.any() else None


def bootstrap_ci(
    groups: np.ndarray,
    metric: Callable[[np.ndarray], float | None],
    n_boot: int = 1000,
    seed: int = 0,
) -> list[float] | None:
    """95 % percentile interval of metric(indices), resampling whole patients (`groups`) with replacement."""
    groups = np.asarray(groups)
    if len(groups) == 0:
        return None
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(unique), len(unique))
        value = metric(np.concatenate([members[g] for g in picked]))
        if value is not None and np.isfinite(value):
            values.append(value)
    if len(values) < n_boot // 10:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
