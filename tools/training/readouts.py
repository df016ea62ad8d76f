"""What is fitted on the trained embedding after the last epoch, and the validation figures that decide
which outputs the appliance publishes.

- OOD: PPCA-Mahalanobis statistics of training frontal CXRs; threshold from held-out training images.
- Severity (extent 0-8, opacity 0-6): ridge regression on the radiologist-scored training images.
- Deterioration risk (death / ICU / intubation): L2 logistic regression on the outcome-labelled training
  images (Cohen and Hannover).
Both read-outs are linear in the embedding, so they become the weights of the severity and risk layers
of the one ONNX graph. For each the feature set (the whole embedding, or the task heads' logits, which
are themselves linear in it) and the regularisation are chosen by patient-grouped cross-validation on
training patients only; validation patients only measure.

Publication rule (docs/reading.md): an output is published when the lower end of its 95 % patient-level
bootstrap interval on validation clears the bar: AUC 0.6 for scores (findings compared within a source,
so a source shortcut cannot pass the gate), R² 0.3 for measurements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from appliance.interpret.zones import DOMINANCE_MARGIN, dominant_side
from appliance.result import Zone
from tools.training import dataset as data
from tools.training import metrics
from tools.training.model import FINDING_LABELS, CxrLite0

if TYPE_CHECKING:
    from tools.training.train import Targets

AUC_BAR = 0.6
R2_BAR = 0.3
CTR_MAE_BAR = 0.03
CTR_MIN_IMAGES = 20
BOOT = 1000


def sigmoid(values: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(values, -60, 60)))


def epoch_summary(out: dict[str, np.ndarray], t: Targets) -> dict[str, float | None]:
    view = t.view.numpy()
    known = view >= 0
    abnormal = t.abnormal.numpy()
    labels = t.labels.numpy()
    sources = np.asarray(t.sources)
    scores = out["finding_logits"]
    within = [
        metrics.within_source_auc(
            labels[labels[:, k] >= 0, k], scores[labels[:, k] >= 0, k], sources[labels[:, k] >= 0]
        )
        for k in range(len(FINDING_LABELS))
    ]
    present = [w for w in within if w is not None]
    nih = (sources == "nih") & (labels[:, 1] >= 0)
    return {
        "view_acc": round(float((out["view_logits"][known].argmax(1) == view[known]).mean()), 4),
        "abnormal_auc": _round(metrics.auc(abnormal[abnormal >= 0], out["abnormal_logit"][abnormal >= 0, 0])),
        "finding_within_macro": _round(float(np.mean(present)) if present else None),
        "nih_pneumonia_auc": _round(metrics.auc(labels[nih, 1], scores[nih, 1])),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Patient-grouped folds (indices of the held-out part of each fold)."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    parts = np.array_split(unique[order], min(k, len(unique)))
    return [np.flatnonzero(np.isin(groups, part)) for part in parts]


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
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


def _feature_sets(model: CxrLite0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Linear maps emb -> features: (matrix (1280, f), offset (f,))."""
    heads = torch.cat([model.abnormal.weight, model.finding.weight]).detach().numpy()
    bias = torch.cat([model.abnormal.bias, model.finding.bias]).detach().numpy()
    dim = heads.shape[1]
    return {
        "embedding": (np.eye(dim, dtype=np.float64), np.zeros(dim)),
        "head_logits": (heads.T.astype(np.float64), bias),
    }


def _cv_predict(
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
    for name, (matrix, offset) in _feature_sets(model).items():
        x = emb_tr @ matrix + offset
        for strength in strengths:

            def fit(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, strength: float = strength) -> np.ndarray:
                w, b = fitter(xa, ya, strength)
                return xb @ w + b

            value = score(y_tr, _cv_predict(fit, x, y_tr, g_tr, seed))
            if value > best[0]:
                best = (value, name, strength)
    value, name, strength = best
    matrix, offset = _feature_sets(model)[name]
    w, b = fitter(emb_tr @ matrix + offset, y_tr, strength)
    return matrix @ w, offset @ w + b, name, strength, value


def fit_severity(
    model: CxrLite0, emb_tr: np.ndarray, y_tr: np.ndarray, g_tr: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Ridge read-out of (extent, opacity): emb-space weights (1280, 2), bias (2,) and what was chosen."""

    def mean_r2(truth: np.ndarray, pred: np.ndarray) -> float:
        return float(np.mean([metrics.r2(truth[:, j], pred[:, j]) or -9 for j in range(2)]))

    w, b, name, alpha, value = _choose_linear(
        model, emb_tr, y_tr, g_tr, seed, _ridge, (1.0, 10.0, 100.0, 1000.0, 10000.0), mean_r2
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


def _auc_entry(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, sources: np.ndarray | None
) -> dict[str, Any]:
    """Pooled AUC, and (with sources) the within-source AUC that the publication gate uses."""

    def pooled(idx: np.ndarray) -> float | None:
        return metrics.auc(labels[idx], scores[idx])

    def within(idx: np.ndarray) -> float | None:
        assert sources is not None
        return metrics.within_source_auc(labels[idx], scores[idx], sources[idx])

    gate = within if sources is not None else pooled
    everything = np.arange(len(labels))
    value, ci = gate(everything), metrics.bootstrap_ci(groups, gate, BOOT)
    return {
        "n_positive": int(labels.sum()),
        "n_negative": int((1 - labels).sum()),
        "auc": _round(pooled(everything)),
        "auc_ci": [round(v, 4) for v in pooled_ci]
        if (pooled_ci := metrics.bootstrap_ci(groups, pooled, BOOT))
        else None,
        "gate_auc": _round(value),
        "gate_auc_ci": [round(v, 4) for v in ci] if ci else None,
        "gate": "within-source AUC" if sources is not None else "AUC",
        "published": bool(ci is not None and ci[0] > AUC_BAR),
    }


def _r2_entry(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    ci = metrics.bootstrap_ci(groups, lambda idx: metrics.r2(truth[idx], pred[idx]), BOOT)
    return {
        "n": len(truth),
        "r2": _round(metrics.r2(truth, pred)),
        "r2_ci": [round(v, 4) for v in ci] if ci else None,
        "mae": _round(metrics.mae(truth, pred)),
    }


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
        matrix, offset = _feature_sets(model)[chosen["features"]]

        def refit(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray) -> np.ndarray:
            wa, ba = _ridge(xa @ matrix + offset, ya, chosen["alpha"])
            return (xb @ matrix + offset) @ wa + ba

        pred_cv = _cv_predict(refit, e_all, y_all, g_all, seed)
        for j, name in enumerate(("extent", "opacity")):
            entry: dict[str, Any] = {
                "validation": _r2_entry(y_va[:, j], np.clip(pred_va[:, j], 0, (8, 6)[j]), g_va),
                "cross_validated": _r2_entry(y_all[:, j], np.clip(pred_cv[:, j], 0, (8, 6)[j]), g_all),
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
        validation["risk"] = {**_auc_entry(r_va, risk_va, g_va, s_va), "fit": chosen}
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
        validation[f"findings.{label}"] = _auc_entry(
            labels[known, k], probs[known, k], groups[known], sources[known]
        )
        points[f"finding.{label}"] = finding_point(labels[known, k], probs[known, k], sources[known])
    abnormal = val_t.abnormal.numpy()
    known = abnormal >= 0
    score = sigmoid(val_out["abnormal_logit"][known, 0])
    validation["abnormal"] = _auc_entry(abnormal[known], score, groups[known], sources[known])
    points["abnormal"] = metrics.threshold_at_sensitivity(abnormal[known], score, 0.90)
    urgent = metrics.threshold_at_specificity(abnormal[known], score, 0.98)
    points["urgent"] = float(min(max(urgent, points["abnormal"]), 0.999))
    view = val_t.view.numpy()
    validation["view"] = {
        "accuracy": _round(float((val_out["view_logits"][view >= 0].argmax(1) == view[view >= 0]).mean())),
        "n": int((view >= 0).sum()),
    }
    validation["masks"] = mask_figures(val_out, val_t, val_masks)
    validation["cardiothoracic_ratio"] = cardiothoracic_entry(validation["masks"])
    if val_mirrored is not None:
        validation["zones"] = zone_figures(val_out, val_mirrored, val_t)
    return {"points": points, "validation": validation}


def mask_figures(out: dict[str, np.ndarray], t: Targets, targets: np.ndarray) -> dict[str, Any]:
    """Dice of the lung and heart masks on validation (64 px, model coordinates), and the
    cardiothoracic ratio from the predicted masks against the one from the reference masks."""
    from appliance.interpret.cardiac import cardiothoracic_ratio

    figures: dict[str, Any] = {}
    for channel, (name, has) in enumerate((("lung", t.has_lung.numpy()), ("heart", t.has_heart.numpy()))):
        rows = np.flatnonzero(has)
        if not len(rows):
            continue
        pred = sigmoid(out[f"{name}_mask"][rows]) >= 0.5
        truth = targets[rows, channel] >= 0.5
        dice = 2 * (pred & truth).sum((1, 2)) / np.maximum(pred.sum((1, 2)) + truth.sum((1, 2)), 1)
        figures[f"{name}_images"] = len(rows)
        figures[f"{name}_dice_median"] = _round(float(np.median(dice)))
    rows = np.flatnonzero(t.has_heart.numpy() & t.has_lung.numpy())
    pairs = []
    for i in rows:
        predicted = cardiothoracic_ratio(sigmoid(out["lung_mask"][i]), sigmoid(out["heart_mask"][i]))
        reference = cardiothoracic_ratio(targets[i, 0].astype(np.float32), targets[i, 1].astype(np.float32))
        if predicted is not None and reference is not None:
            pairs.append((reference.ratio, predicted.ratio))
    if pairs:
        ref, pred_ctr = np.array(pairs).T
        figures["ctr_images"] = len(pairs)
        figures["ctr_mae"] = _round(float(np.abs(ref - pred_ctr).mean()))
        figures["ctr_pearson"] = _round(float(np.corrcoef(ref, pred_ctr)[0, 1])) if len(pairs) > 2 else None
        figures["ctr_agreement_enlarged"] = _round(float(((ref >= 0.5) == (pred_ctr >= 0.5)).mean()))
    return figures


def cardiothoracic_entry(masks: dict[str, Any]) -> dict[str, Any]:
    """The ratio is published when, on validation images with reference masks, it is within CTR_MAE_BAR
    of the reference on average (reader variability of the CTR is a few hundredths) over enough images."""
    mae = masks.get("ctr_mae")
    n = masks.get("ctr_images", 0)
    return {
        "n": n,
        "mae": mae,
        "pearson": masks.get("ctr_pearson"),
        "agreement_enlarged": masks.get("ctr_agreement_enlarged"),
        "rule": f"mae <= {CTR_MAE_BAR} on >= {CTR_MIN_IMAGES} images",
        "published": bool(mae is not None and mae <= CTR_MAE_BAR and n >= CTR_MIN_IMAGES),
    }


MIRROR_BAR = 0.90
SIDE_SHARE = (0.35, 0.65)


def _zones(out: dict[str, np.ndarray], i: int) -> list[Zone]:
    """The appliance's own zone code on one image's maps (model coordinates; no letterbox to undo)."""
    from appliance.interpret.reading import ZONE_MIN_INVOLVEMENT, lung_heat
    from appliance.interpret.zones import lung_zones

    lungs = sigmoid(out["lung_mask"][i])
    return lung_zones(lung_heat(out["heatmap"][i], lungs, 0.5), lungs, 0.5, ZONE_MIN_INVOLVEMENT)


def zone_figures(out: dict[str, np.ndarray], mirrored: dict[str, np.ndarray], t: Targets) -> dict[str, Any]:
    """Mirror test on the abnormal validation images: where the zones have a dominant side, the
    mirrored image's zones must have the other one. Published only when it holds for >= 90 % and the
    left/right share of all involvement is balanced (35-65 %)."""
    rows = np.flatnonzero(t.abnormal.numpy() == 1)
    agree = judged = 0
    left = right = 0.0
    for i in rows:
        plain = _zones(out, int(i))
        right += sum(z.involvement for z in plain if z.side == "right")
        left += sum(z.involvement for z in plain if z.side == "left")
        side = dominant_side(plain)
        if side is None:
            continue
        judged += 1
        agree += dominant_side(_zones(mirrored, int(i))) == {"right": "left", "left": "right"}[side]
    consistency = agree / judged if judged else None
    share = left / (left + right) if left + right > 0 else None
    return {
        "mirror_consistency": _round(consistency),
        "judged": judged,
        "abnormal_images": len(rows),
        "dominance_margin": DOMINANCE_MARGIN,
        "left_share": _round(share),
        "published": bool(
            consistency is not None
            and consistency >= MIRROR_BAR
            and share is not None
            and SIDE_SHARE[0] <= share <= SIDE_SHARE[1]
        ),
    }
