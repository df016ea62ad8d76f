"""What is fitted on the trained embedding after the last epoch, and the validation figures that decide
which outputs the appliance publishes.

- OOD: PPCA-Mahalanobis statistics of training frontal CXRs; threshold from held-out training images.
- Severity (extent 0-8, opacity 0-6): ridge regression on the radiologist-scored training images.
- Deterioration risk (death / ICU / intubation): L2 logistic regression on the outcome-labelled training
  images (Cohen and Hannover).
- Operating points of the findings, abnormal and risk, on validation.
Both read-outs are linear in the embedding, so they become the weights of the severity and risk layers
of the one ONNX graph (how they are chosen: readout_fits.py); validation patients only measure.

Publication rule (docs/reading.md, applied in readout_figures.py): an output is published when the lower
end of its 95 % patient-level bootstrap interval on validation clears the bar: AUC 0.6 for scores
(findings compared within a source, so a source shortcut cannot pass the gate), R² 0.3 for measurements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tools.training import dataset as data
from tools.training import metrics
from tools.training.model import FINDING_LABELS, CxrLite0
from tools.training.readout_figures import (
    R2_BAR,
    auc_entry,
    cardiothoracic_entry,
    mask_figures,
    r2_entry,
    rounded,
    sigmoid,
    zone_figures,
)
from tools.training.readout_fits import cv_predict, feature_sets, fit_risk, fit_severity, ridge
from tools.training.targets import Targets

FINDING_SPECIFICITY = 0.90


def finding_point(labels: np.ndarray, scores: np.ndarray, sources: np.ndarray) -> float:
    """The operating point of one finding: 90 % specificity among the negatives of the sources that
    hold positives of it. Pooled negatives are mostly easy ones from other sources (thousands of
    small c19r normals), and a point chosen on them would call the finding on most hard images."""
    relevant = np.isin(sources, np.unique(sources[labels == 1]))
    return metrics.threshold_at_specificity(labels[relevant], scores[relevant], FINDING_SPECIFICITY)


def fit_all(
    model: CxrLite0,
    train_out: dict[str, np.ndarray],
    train_t: Targets,
    val_out: dict[str, np.ndarray],
    val_t: Targets,
    val_masks: np.ndarray,
    seed: int,
    val_mirrored: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    validation: dict[str, Any] = {}
    points: dict[str, float] = {}
    # --- OOD on training frontal CXRs (70 % fit / 30 % threshold at their 99.5th percentile)
    # Every training chest X-ray that is not a lateral: the view column is blank for whole sources
    # (all of c19r), and an OOD model that never saw them would refuse them as "not a chest X-ray".
    frontal = np.flatnonzero(
        np.array([r is not None and r.is_cxr and r.view != data.VIEW_LATERAL for r in train_t.records])
    )
    emb = torch.from_numpy(train_out["embedding"][frontal])
    order = torch.randperm(len(emb), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(order))
    model.ood.fit(emb[order[:cut]])
    with torch.no_grad():
        held_out = model.ood(emb[order[cut:]])[:, 0].numpy()
    points["ood"] = float(np.percentile(held_out, 99.5))

    # --- severity
    def scored(t: Targets, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [i for i, r in enumerate(t.records) if r is not None and not np.isnan(r.extent)]
        y = np.array([[t.records[i].extent, t.records[i].opacity] for i in rows])  # type: ignore[union-attr]
        return out["embedding"][rows].astype(np.float64), y, np.asarray(t.patients)[rows]

    e_tr, y_tr, g_tr = scored(train_t, train_out)
    e_va, y_va, g_va = scored(val_t, val_out)
    if len(y_tr) >= 10:
        w, b, chosen = fit_severity(model, e_tr, y_tr, g_tr, seed)
        with torch.no_grad():
            model.severity.weight.copy_(torch.from_numpy(w.T).float())
            model.severity.bias.copy_(torch.from_numpy(b).float())
        pred_va = e_va @ w + b
        # Cross-validated R² over every scored patient (train + validation), refitting the chosen model
        # in each fold: the figure comparable to Cohen et al. (2020).
        e_all, y_all, g_all = (
            np.concatenate([e_tr, e_va]),
            np.concatenate([y_tr, y_va]),
            np.concatenate([g_tr, g_va]),
        )
        matrix, offset = feature_sets(model)[chosen["features"]]

        def refit(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray) -> np.ndarray:
            wa, ba = ridge(xa @ matrix + offset, ya, chosen["alpha"])
            return (xb @ matrix + offset) @ wa + ba

        pred_cv = cv_predict(refit, e_all, y_all, g_all, seed)
        for j, name in enumerate(("extent", "opacity")):
            entry: dict[str, Any] = {
                "validation": r2_entry(y_va[:, j], np.clip(pred_va[:, j], 0, (8, 6)[j]), g_va),
                "cross_validated": r2_entry(y_all[:, j], np.clip(pred_cv[:, j], 0, (8, 6)[j]), g_all),
                "fit": chosen,
            }
            cv_ci = entry["cross_validated"]["r2_ci"]
            entry["published"] = bool(cv_ci is not None and cv_ci[0] > R2_BAR)
            validation[f"severity.{name}"] = entry

    # --- deterioration risk
    def outcomes(
        t: Targets, out: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = [i for i, r in enumerate(t.records) if r is not None and r.adverse >= 0]
        y = np.array([t.records[i].adverse for i in rows])  # type: ignore[union-attr]
        return (
            out["embedding"][rows].astype(np.float64),
            y,
            np.asarray(t.patients)[rows],
            np.asarray(t.sources)[rows],
        )

    e_tr, r_tr, g_tr, _ = outcomes(train_t, train_out)
    e_va, r_va, g_va, s_va = outcomes(val_t, val_out)
    if len(set(r_tr.tolist())) == 2:
        w_risk, b_risk, chosen = fit_risk(model, e_tr, r_tr, g_tr, seed)
        with torch.no_grad():
            model.risk.weight.copy_(torch.from_numpy(w_risk[None]).float())
            model.risk.bias.fill_(float(b_risk))
        risk_va = sigmoid(e_va @ w_risk + b_risk)
        # Within source: Hannover patients are nearly all ICU cases, so a pooled AUC would reward
        # recognising the Hannover images rather than the disease.
        validation["risk"] = {**auc_entry(r_va, risk_va, g_va, s_va), "fit": chosen}
        if len(set(r_va.tolist())) == 2:
            points["risk"] = metrics.youden_threshold(r_va, risk_va)
            points["urgent_risk"] = float(min(metrics.threshold_at_specificity(r_va, risk_va, 0.9), 0.999))

    # --- findings, abnormal, view
    labels, sources, groups = val_t.labels.numpy(), np.asarray(val_t.sources), np.asarray(val_t.patients)
    probs = sigmoid(val_out["finding_logits"])
    for k, label in enumerate(FINDING_LABELS):
        known = labels[:, k] >= 0
        if len(set(labels[known, k].tolist())) < 2:
            validation[f"findings.{label}"] = {
                "published": False,
                "note": "no positives or negatives in validation",
            }
            continue
        validation[f"findings.{label}"] = auc_entry(
            labels[known, k], probs[known, k], groups[known], sources[known]
        )
        points[f"finding.{label}"] = finding_point(labels[known, k], probs[known, k], sources[known])
    abnormal = val_t.abnormal.numpy()
    known = abnormal >= 0
    score = sigmoid(val_out["abnormal_logit"][known, 0])
    validation["abnormal"] = auc_entry(abnormal[known], score, groups[known], sources[known])
    points["abnormal"] = metrics.threshold_at_sensitivity(abnormal[known], score, 0.90)
    urgent = metrics.threshold_at_specificity(abnormal[known], score, 0.98)
    points["urgent"] = float(min(max(urgent, points["abnormal"]), 0.999))
    view = val_t.view.numpy()
    validation["view"] = {
        "accuracy": rounded(float((val_out["view_logits"][view >= 0].argmax(1) == view[view >= 0]).mean())),
        "n": int((view >= 0).sum()),
    }
    validation["masks"] = mask_figures(val_out, val_t, val_masks)
    validation["cardiothoracic_ratio"] = cardiothoracic_entry(validation["masks"])
    if val_mirrored is not None:
        validation["zones"] = zone_figures(val_out, val_mirrored, val_t)
    return {"points": points, "validation": validation}
