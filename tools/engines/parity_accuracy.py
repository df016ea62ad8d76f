"""The parity gate's accuracy check (rule 1 of tools/engines/parity_gate.py, docs/parity.md): FP32 and the
candidate scored against the labels of the gate's images, where the data set has them (AUC for scores,
MAE for severity and the cardiothoracic ratio, Dice for the masks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.manifest import Manifest, OutputSpec, Role
from tools.engines.parity_scores import SEVERITY_RANGES, Score, mask_threshold, output_spec, raw_ratio
from tools.training import dataset, metrics

AUC_DELTA = 0.005
REGRESSION_DELTA = 0.005  # x the label's range width (severity), absolute for the ratio and Dice


def truth(spec: OutputSpec, label: str, record: dataset.Record) -> int | None:
    """Binary ground truth for one output column from metadata.csv, when the data set knows it."""
    name = label.lower()
    if spec.role is Role.abnormal:
        return None if record.abnormal == dataset.UNKNOWN else record.abnormal
    if spec.role is Role.risk:
        return None if record.adverse == dataset.UNKNOWN else record.adverse
    if spec.role is Role.ood:
        return int(not record.is_cxr)
    if spec.role is Role.view:
        wanted = {"lateral": dataset.VIEW_LATERAL, "frontal": dataset.VIEW_FRONTAL}.get(
            name, dataset.VIEW_NOT_CXR
        )
        return None if record.view == dataset.UNKNOWN else int(record.view == wanted)
    if spec.role is Role.findings and label in dataset.FINDING_LABELS and record.labels:
        value = record.labels[dataset.FINDING_LABELS.index(label)]
        return None if value == dataset.UNKNOWN else value
    if spec.role is Role.findings:
        known = {f.lower() for f in (*dataset.FINDING_INDEX, *dataset.ABNORMAL_FINDINGS)}
        if name not in known or not record.is_cxr or record.finding_name.lower() not in known:
            return None
        return int(record.finding_name.lower() == name)
    return None


@dataclass
class Truth:
    """What the labels say about the gate's images (None: no labels known, accuracy not judged)."""

    records: Sequence[dataset.Record]
    lung: list[np.ndarray | None]
    heart: list[np.ndarray | None]

    @classmethod
    def load(cls, records: Sequence[dataset.Record], data: Path | None) -> Truth:
        lung: list[np.ndarray | None] = []
        heart: list[np.ndarray | None] = []
        for record in records:
            for files, attr in ((lung, record.mask_file), (heart, record.heart_mask_file)):
                path = data / attr if data is not None and attr else None
                files.append(dataset.mask_target(path) if path is not None and path.is_file() else None)
        return cls(records, lung, heart)


def _resize_to(target: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if target.shape == shape:
        return target
    image = Image.fromarray(target.astype(np.float32), mode="F").resize((shape[1], shape[0]))
    return np.asarray(image, dtype=np.float64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def accuracy(
    score: Score, manifest: Manifest, known: Truth | None, ref: np.ndarray, cand: np.ndarray
) -> dict[str, Any] | None:
    """FP32 vs candidate accuracy against the labels, or None where this score has none."""
    if known is None:
        return None
    records = known.records
    if score.kind in ("logit", "value") and score.role != "severity":
        spec = output_spec(manifest, score.output)
        pairs = [(i, t) for i, r in enumerate(records) if (t := truth(spec, score.label, r)) is not None]
        if not pairs:
            return None
        rows = np.asarray([i for i, _ in pairs])
        labels = np.asarray([t for _, t in pairs])
        a, b = metrics.auc(labels, ref[rows]), metrics.auc(labels, cand[rows])
        if a is None or b is None:
            return None
        return {"metric": "AUC", "n": len(rows), "fp32": a, "candidate": b, "limit": AUC_DELTA}
    if score.role == "severity":
        spec = output_spec(manifest, score.output)
        target = np.array([getattr(r, score.label, math.nan) for r in records], dtype=np.float64)
        rows = ~np.isnan(target)
        if not rows.any():
            return None
        low, high = spec.ranges.get(score.label, SEVERITY_RANGES.get(score.label, (0.0, 8.0)))
        a, b = (float(np.abs(v[rows] - target[rows]).mean()) for v in (ref, cand))
        return {
            "metric": "MAE",
            "n": int(rows.sum()),
            "fp32": a,
            "candidate": b,
            "limit": REGRESSION_DELTA * (high - low),
        }
    if score.kind == "argmax":
        spec = output_spec(manifest, score.output)
        deltas, fp32 = [], []
        for column, label in enumerate(spec.labels):
            pairs = [(i, t) for i, r in enumerate(records) if (t := truth(spec, label, r)) is not None]
            if not pairs:
                continue
            rows = np.asarray([i for i, _ in pairs])
            labels = np.asarray([t for _, t in pairs])
            a = metrics.auc(labels, _softmax(ref[rows])[:, column])
            b = metrics.auc(labels, _softmax(cand[rows])[:, column])
            if a is not None and b is not None:
                deltas.append(abs(b - a))
                fp32.append(a)
        if not deltas:
            return None
        worst = int(np.argmax(deltas))
        return {
            "metric": "AUC (worst class)",
            "n": len(records),
            "fp32": fp32[worst],
            "candidate": fp32[worst] + deltas[worst],
            "limit": AUC_DELTA,
        }
    if score.kind == "ctr":
        return _ctr_accuracy(known, ref, cand)
    if score.kind == "mask":
        return _mask_accuracy(score, manifest, known, ref, cand)
    return None


def _ctr_accuracy(known: Truth, ref: np.ndarray, cand: np.ndarray) -> dict[str, Any] | None:
    """Cardiothoracic ratio against the ratio of the reference lung and heart masks."""
    rows, reference = [], []
    for i, (lungs, heart) in enumerate(zip(known.lung, known.heart, strict=True)):
        if lungs is not None and heart is not None:
            rows.append(i)
            reference.append(raw_ratio(lungs, heart))
    if not rows:
        return None
    index, truth_ratio = np.asarray(rows, dtype=int), np.asarray(reference)
    usable = ~np.isnan(truth_ratio) & ~np.isnan(ref[index]) & ~np.isnan(cand[index])
    if not usable.any():
        return None
    a = float(np.abs(ref[index][usable] - truth_ratio[usable]).mean())
    b = float(np.abs(cand[index][usable] - truth_ratio[usable]).mean())
    return {"metric": "MAE", "n": int(usable.sum()), "fp32": a, "candidate": b, "limit": REGRESSION_DELTA}


def _mask_accuracy(
    score: Score, manifest: Manifest, known: Truth, ref: np.ndarray, cand: np.ndarray
) -> dict[str, Any] | None:
    """Mean Dice against the reference masks (lung or heart) of the images that have one."""
    targets = known.lung if score.key == "lung_mask" else known.heart
    threshold = mask_threshold(manifest, score)
    dice_a, dice_b = [], []
    for i, target in enumerate(targets):
        if target is None:
            continue
        truth_mask = _resize_to(target, ref[i].shape) >= 0.5
        dice_a.append(_dice(ref[i] >= threshold, truth_mask))
        dice_b.append(_dice(cand[i] >= threshold, truth_mask))
    if not dice_a:
        return None
    return {
        "metric": "Dice",
        "n": len(dice_a),
        "fp32": float(np.mean(dice_a)),
        "candidate": float(np.mean(dice_b)),
        "limit": REGRESSION_DELTA,
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))
