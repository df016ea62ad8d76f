"""The validation figures of the trained model and the publication rule they are judged by
(docs/reading.md): an output is published when the lower end of its 95 % patient-level bootstrap
interval on validation clears the bar: AUC 0.6 for scores (findings compared within a source, so a
source shortcut cannot pass the gate), R² 0.3 for measurements; the cardiothoracic ratio and the zones
have their own bars below. Also the short per-epoch summary tools/training/train_loop.py prints."""

from __future__ import annotations

from typing import Any

import numpy as np

from appliance.interpret.zones import DOMINANCE_MARGIN, dominant_side
from appliance.result import Zone
from tools.training import metrics
from tools.training.model import FINDING_LABELS
from tools.training.targets import Targets

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
        "abnormal_auc": rounded(
            metrics.auc(abnormal[abnormal >= 0], out["abnormal_logit"][abnormal >= 0, 0])
        ),
        "finding_within_macro": rounded(float(np.mean(present)) if present else None),
        "nih_pneumonia_auc": rounded(metrics.auc(labels[nih, 1], scores[nih, 1])),
    }


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def auc_entry(
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
        "auc": rounded(pooled(everything)),
        "auc_ci": [round(v, 4) for v in pooled_ci]
        if (pooled_ci := metrics.bootstrap_ci(groups, pooled, BOOT))
        else None,
        "gate_auc": rounded(value),
        "gate_auc_ci": [round(v, 4) for v in ci] if ci else None,
        "gate": "within-source AUC" if sources is not None else "AUC",
        "published": bool(ci is not None and ci[0] > AUC_BAR),
    }


def r2_entry(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    ci = metrics.bootstrap_ci(groups, lambda idx: metrics.r2(truth[idx], pred[idx]), BOOT)
    return {
        "n": len(truth),
        "r2": rounded(metrics.r2(truth, pred)),
        "r2_ci": [round(v, 4) for v in ci] if ci else None,
        "mae": rounded(metrics.mae(truth, pred)),
    }


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
        figures[f"{name}_dice_median"] = rounded(float(np.median(dice)))
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
        figures["ctr_mae"] = rounded(float(np.abs(ref - pred_ctr).mean()))
        figures["ctr_pearson"] = rounded(float(np.corrcoef(ref, pred_ctr)[0, 1])) if len(pairs) > 2 else None
        figures["ctr_agreement_enlarged"] = rounded(float(((ref >= 0.5) == (pred_ctr >= 0.5)).mean()))
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
        "mirror_consistency": rounded(consistency),
        "judged": judged,
        "abnormal_images": len(rows),
        "dominance_margin": DOMINANCE_MARGIN,
        "left_share": rounded(share),
        "published": bool(
            consistency is not None
            and consistency >= MIRROR_BAR
            and share is not None
            and SIDE_SHARE[0] <= share <= SIDE_SHARE[1]
        ),
    }
