"""The sequence risk model of tools/training/train_sequence_risk.py: L2 logistic regression on
standardised features, fitted by Newton steps (numpy only), and its patient-grouped cross-validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.interpret.sequence_risk import features, image_risk
from appliance.manifest import SequenceFeature
from tools.training.sequence_risk_pairs import Pair

FEATURES: list[SequenceFeature] = ["risk_logit", "risk_logit_change", "extent", "extent_change", "log_days"]
FOLDS = 5
SEED = 0


@dataclass(frozen=True)
class Fitted:
    mean: np.ndarray
    scale: np.ndarray
    coefficients: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Training-side probability; the appliance recomputes it from the manifest's numbers."""
        z = (x - self.mean) / self.scale
        return np.asarray(1.0 / (1.0 + np.exp(-(z @ self.coefficients + self.intercept))))


def fit(x: np.ndarray, y: np.ndarray, lam: float) -> Fitted:
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    design = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    penalty = np.diag([0.0] + [lam] * x.shape[1])  # the intercept is not shrunk
    w = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        gradient = design.T @ (p - y) + penalty @ w
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Fitted(mean, scale, w[1:].copy(), float(w[0]))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, lam: float) -> np.ndarray:
    """Patient-grouped K-fold predictions (every patient's pairs held out together)."""
    patients = np.unique(groups)
    np.random.default_rng(SEED).shuffle(patients)
    fold_of = {p: i % FOLDS for i, p in enumerate(patients)}
    folds = np.array([fold_of[g] for g in groups])
    pred = np.full(len(y), np.nan)
    for k in range(FOLDS):
        held = folds == k
        if held.any() and len(np.unique(y[~held])) == 2:
            pred[held] = fit(x[~held], y[~held], lam).predict(x[held])
    return pred


def matrix(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels, patient groups, single-image risk; pairs missing a feature are dropped."""
    rows, ys, groups, single = [], [], [], []
    for pair in pairs:
        vector = features(pair.current, pair.prior, FEATURES)
        own = image_risk(pair.current)
        if vector is None or own is None:
            continue
        rows.append(vector)
        ys.append(pair.adverse)
        groups.append(pair.patient)
        single.append(own)
    x = np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES))
    return x, np.array(ys, dtype=np.float64), np.array(groups), np.array(single, dtype=np.float64)
