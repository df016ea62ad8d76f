"""Metrics and operating points (numpy only): AUC, R², thresholds, patient-level bootstrap."""

from __future__ import annotations

import numpy as np

# Shared with the appliance runtime (`cxr-appliance recalibrate`), which must not import tools/.
from appliance.operating_points import (  # noqa: F401  (re-exported)
    _between,
    bootstrap_ci,
    threshold_at_sensitivity,
    threshold_at_specificity,
)


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
