"""The linear read-outs fitted on the trained embedding (tools/training/readouts.py): ridge regression
for severity, L2 logistic regression for deterioration risk. For each the feature set (the whole
embedding, or the task heads' logits, which are themselves linear in it) and the regularisation are
chosen by patient-grouped cross-validation on training patients only, so the result is again linear in
the embedding and becomes the weights of a layer of the one ONNX graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tools.training import metrics
from tools.training.model import CxrLite0


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Patient-grouped folds (indices of the held-out part of each fold)."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    parts = np.array_split(unique[order], min(k, len(unique)))
    return [np.flatnonzero(np.isin(groups, part)) for part in parts]


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on standardised features; returns weights and bias in the original feature units."""
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    ym = y.mean(0)
    coef = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - ym))
    weights = coef / scale[:, None]
    return weights, ym - mean @ weights


def _logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    if len(set(y.tolist())) < 2:  # a fold of a small set may hold one class: predict its base rate
        rate = float(np.clip(np.mean(y), 0.01, 0.99))
        return np.zeros(x.shape[1]), float(np.log(rate / (1 - rate)))
    mean, scale = x.mean(0), x.std(0) + 1e-6
    fitted = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit((x - mean) / scale, y)
    weights = fitted.coef_[0] / scale
    return weights, float(fitted.intercept_[0] - mean @ weights)


def feature_sets(model: CxrLite0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Linear maps emb -> features: (matrix (1280, f), offset (f,))."""
    heads = torch.cat([model.abnormal.weight, model.finding.weight]).detach().numpy()
    bias = torch.cat([model.abnormal.bias, model.finding.bias]).detach().numpy()
    dim = heads.shape[1]
    return {
        "embedding": (np.eye(dim, dtype=np.float64), np.zeros(dim)),
        "head_logits": (heads.T.astype(np.float64), bias),
    }


def cv_predict(
    fit: Any, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, k: int = 5
) -> np.ndarray:
    pred = np.zeros(y.shape, dtype=np.float64)
    for held in _folds(groups, k, seed):
        keep = np.setdiff1d(np.arange(len(y)), held)
        pred[held] = fit(x[keep], y[keep], x[held])
    return pred


Fitter = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, Any]]


def _choose_linear(
    model: CxrLite0,
    emb_tr: np.ndarray,
    y_tr: np.ndarray,
    g_tr: np.ndarray,
    seed: int,
    fitter: Fitter,
    strengths: tuple[float, ...],
    score: Callable[[np.ndarray, np.ndarray], float],
) -> tuple[np.ndarray, Any, str, float, float]:
    """The feature set and regularisation with the best patient-grouped CV score on training patients,
    refitted on all of them; returns emb-space weights and bias, the choice and its CV score."""
    best: tuple[float, str, float] = (-np.inf, "", 0.0)
    for name, (matrix, offset) in feature_sets(model).items():
        x = emb_tr @ matrix + offset
        for strength in strengths:

            def fit(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, strength: float = strength) -> np.ndarray:
                w, b = fitter(xa, ya, strength)
                return xb @ w + b

            value = score(y_tr, cv_predict(fit, x, y_tr, g_tr, seed))
            if value > best[0]:
                best = (value, name, strength)
    value, name, strength = best
    matrix, offset = feature_sets(model)[name]
    w, b = fitter(emb_tr @ matrix + offset, y_tr, strength)
    return matrix @ w, offset @ w + b, name, strength, value


def fit_severity(
    model: CxrLite0, emb_tr: np.ndarray, y_tr: np.ndarray, g_tr: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Ridge read-out of (extent, opacity): emb-space weights (1280, 2), bias (2,) and what was chosen."""

    def mean_r2(truth: np.ndarray, pred: np.ndarray) -> float:
        return float(np.mean([metrics.r2(truth[:, j], pred[:, j]) or -9 for j in range(2)]))

    w, b, name, alpha, value = _choose_linear(
        model, emb_tr, y_tr, g_tr, seed, ridge, (1.0, 10.0, 100.0, 1000.0, 10000.0), mean_r2
    )
    return w, b, {"features": name, "alpha": alpha, "train_cv_r2": round(value, 4)}


def fit_risk(
    model: CxrLite0, emb_tr: np.ndarray, y_tr: np.ndarray, g_tr: np.ndarray, seed: int
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """L2 logistic read-out of death / ICU / intubation."""

    def auc(truth: np.ndarray, pred: np.ndarray) -> float:
        return metrics.auc(truth, pred) or 0.0

    w, b, name, c, value = _choose_linear(
        model, emb_tr, y_tr, g_tr, seed, _logistic, (0.001, 0.01, 0.1, 1.0), auc
    )
    return w, float(b), {"features": name, "C": c, "train_cv_auc": round(value, 4)}
