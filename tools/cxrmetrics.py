"""Metrics and operating points (numpy only): AUC, R², thresholds, patient-level bootstrap."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney with tie correction); None when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties so equal scores count half.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest AUC averaged over classes that have both positives and negatives."""
    values = [auc(labels == k, probs[:, k]) for k in range(probs.shape[1])]
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def r2(truth: np.ndarray, pred: np.ndarray) -> float | None:
    if len(truth) < 2:
        return None
    total = float(((truth - truth.mean()) ** 2).sum())
    return None if total == 0 else 1.0 - float(((truth - pred) ** 2).sum()) / total


def mae(truth: np.ndarray, pred: np.ndarray) -> float | None:
    return float(np.abs(truth - pred).mean()) if len(truth) else None


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


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        return 0.5
    best, best_t = -1.0, 0.5
    for t in np.unique(scores):
        j = float((scores[labels] >= t).mean() + (scores[~labels] < t).mean() - 1)
        if j > best:
            best, best_t = j, float(t)
    return _between(scores, best_t, above=False)


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


def within_source_auc(labels: np.ndarray, scores: np.ndarray, sources: np.ndarray) -> float | None:
    """AUC over positive/negative pairs taken from the same source only: a model that merely tells the
    sources apart scores 0.5 here, whatever the mix of sources in the pooled AUC."""
    labels = np.asarray(labels).astype(bool)
    sources = np.asarray(sources)
    weighted, pairs = 0.0, 0
    for source in np.unique(sources):
        inside = sources == source
        n_pos, n_neg = int(labels[inside].sum()), int((~labels[inside]).sum())
        value = auc(labels[inside], scores[inside])
        if value is not None:
            weighted += value * n_pos * n_neg
            pairs += n_pos * n_neg
    return weighted / pairs if pairs else None
