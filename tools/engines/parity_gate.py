#!/usr/bin/env python3
"""The parity gate shared by tools/engines/quantize.py and tools/engines/check_parity.py (the rule: docs/parity.md).

A candidate (FP16 or INT8 ONNX, a TensorRT engine, ...) stands in for the FP32 model only if, on the
validation patients and for every score the appliance PUBLISHES (the manifest's `published:` lists):

  1. accuracy   |AUC(candidate) - AUC(fp32)| <= 0.005 against the labels (regressions: |ΔMAE| <= 0.005 x
                the label's range; cardiothoracic ratio: |ΔMAE| <= 0.005; masks: |ΔDice| <= 0.005);
  2. deviation  the candidate moves scores no more than re-reading the same image does: on the images the
                reading noise was measured on, the 99th percentile and the mean of |Δscore| are at most
                the noise's, and over all images the 99th percentile is at most the noise's;
  3. decisions  no image whose FP32 score lies outside the band around an operating point changes its
                decision. The band is the largest |Δscore| re-reading produced on any of those images, so
                a flip outside it is one that re-reading never produces; flips inside are counted (also
                those beyond the noise's 99th percentile) and reported.

The reading noise: the FP32 model on each file decoded at full resolution instead of with the appliance's
reduced-size (DCT-scaled) decoding, on the validation images where the two reads differ. Also measured
and reported: FP32 run-to-run with another thread count and batch size, and a JPEG re-encoding. Scores
are compared as published and where decisions are taken: logits (capped where the 4-decimal score stops
changing) for sigmoid outputs, severity clipped to its range, the OOD distance, the view's top-2
log-odds margin, the cardiothoracic ratio, the zones' involvement. `python -m tools.engines.parity_gate noise
--model DIR` writes the noise to <model>/parity_noise.json; quantize.py and check_parity.py measure it
there when it is missing or was made for another model or image set.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from appliance.errors import InputRejected, UserError
from appliance.interpret.activation import activate
from appliance.interpret.cardiac import MASK_THRESHOLD, MIN_PIXELS, PLAUSIBLE, WORK_SIZE
from appliance.interpret.cardiac import _upsample as upsample
from appliance.interpret.reading import ZONE_MIN_INVOLVEMENT, lung_heat
from appliance.interpret.zones import lung_zones
from appliance.manifest import Manifest, OutputSpec, Precision, Role, sha256_file
from appliance.preprocess import preprocess
from tools.training import dataset, metrics

AUC_DELTA = 0.005
REGRESSION_DELTA = 0.005  # x the label's range width (severity), absolute for the ratio and Dice
DEVIATION_PERCENTILE = 99.0
MIN_NOISE_IMAGES = 30  # fewer images whose two reads differ: the band falls back to the re-encoding noise
JPEG_QUALITY = 95  # the re-encoded copy: the smallest JPEG loss a PACS export commonly applies
NOISE_FILE = "parity_noise.json"
NOISE_VERSION = 2  # stored noise of another version is measured again
# Scores are published rounded to 4 decimals: beyond logit(1 - 0.5e-4) = 9.90 a sigmoid score reads 1.0000
# (and 0.0000 below -9.90), so logits are compared capped there. Severity is published clipped to its range.
LOGIT_CAP = math.log((1 - 0.5e-4) / 0.5e-4)
SEVERITY_RANGES = {"extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
BAND_SOURCE = "decode"
ZONE_SLOTS = [(side, level) for side in ("right", "left") for level in ("upper", "middle", "lower")]

Kind = Literal["logit", "value", "argmax", "ctr", "zones", "mask", "heatmap"]
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Point:
    """An operating point in the score's own units (for a sigmoid output: the logit of the threshold)."""

    name: str
    threshold: float
    strict: bool = False  # decision is score > threshold (the OOD refusal), else score >= threshold


@dataclass(frozen=True)
class Score:
    """One scalar (per image, or per zone) the appliance decides on or publishes."""

    key: str
    output: str
    kind: Kind
    unit: str
    points: tuple[Point, ...] = ()
    column: int = 0
    gated: bool = True  # published: judged; unpublished: reported only
    role: str = ""
    label: str = ""


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def scores(manifest: Manifest) -> list[Score]:
    """Every published score of the manifest, with its operating points (unpublished ones: gated=False)."""
    out: list[Score] = []
    triage = manifest.triage
    lung = manifest.output(Role.lung_mask)
    zones_published = False
    ctr_published = False
    for spec in manifest.outputs:
        role = spec.role
        if role in (Role.findings, Role.abnormal, Role.risk, Role.ood, Role.severity):
            sigmoid = spec.activation == "sigmoid"
            kind: Kind = "logit" if sigmoid else "value"
            unit = "logit" if sigmoid else (spec.units.get(spec.labels[0], "") if spec.labels else "")
            labels = spec.labels or [role.value]
            risk_published = all(spec.is_published(label) for label in labels)
            for column, label in enumerate(labels):

                def at(p: float, sig: bool = sigmoid) -> float:
                    return _logit(p) if sig else p

                points: list[Point] = []
                if role is Role.findings:
                    points.append(Point(label, at(spec.thresholds.get(label, 0.5))))
                elif role is Role.abnormal:
                    point = triage.abnormal_threshold
                    point = spec.thresholds.get(label) if point is None else point
                    points.append(Point(label, at(0.5 if point is None else point)))
                    if triage.urgent_threshold is not None:
                        points.append(Point("urgent", at(triage.urgent_threshold)))
                elif role is Role.risk:
                    if label in spec.thresholds:
                        points.append(Point(label, at(spec.thresholds[label])))
                    if triage.urgent_risk is not None:
                        points.append(Point("urgent", at(triage.urgent_risk)))
                elif role is Role.ood:
                    threshold = spec.thresholds.get(label, spec.thresholds.get("ood"))
                    if threshold is not None:
                        points.append(Point("refuse", at(threshold), strict=True))
                elif role is Role.severity and label == "extent" and triage.urgent_extent is not None:
                    points.append(Point("urgent", triage.urgent_extent))
                gated = risk_published if role is Role.risk else spec.is_published(label)
                unit_here = spec.units.get(label, unit) if role is Role.severity else unit
                out.append(
                    Score(
                        f"{role.value}.{label}",
                        spec.name,
                        kind,
                        unit_here,
                        tuple(points),
                        column,
                        gated,
                        role.value,
                        label,
                    )
                )
        elif role is Role.view:
            out.append(Score("view", spec.name, "argmax", "log-odds", (Point("class", 0.0),), role="view"))
        elif role is Role.heart_mask and lung is not None:
            ctr_published = spec.published is not None and spec.is_published("cardiothoracic_ratio")
            out.append(
                Score(
                    "cardiothoracic_ratio",
                    spec.name,
                    "ctr",
                    "ratio",
                    (Point("enlarged", triage.cardiomegaly_ratio),),
                    gated=ctr_published,
                    role="heart_mask",
                )
            )
        elif role is Role.heatmap:
            zones_published = spec.is_published("zones")
            out.append(
                Score(
                    "zones",
                    spec.name,
                    "zones",
                    "share",
                    (Point("positive", ZONE_MIN_INVOLVEMENT),),
                    gated=zones_published,
                    role="heatmap",
                )
            )
            out.append(Score("heatmap", spec.name, "heatmap", "map", gated=zones_published, role="heatmap"))
    for spec in manifest.outputs:
        if spec.role is Role.lung_mask:
            out.append(
                Score("lung_mask", spec.name, "mask", "pixels", gated=zones_published or ctr_published)
            )
        elif spec.role is Role.heart_mask:
            out.append(Score("heart_mask", spec.name, "mask", "pixels", gated=ctr_published))
    return out


# --- values, deviations, decisions ---------------------------------------------------------------


def _spec(manifest: Manifest, name: str) -> OutputSpec:
    return next(o for o in manifest.outputs if o.name == name)


def _map(manifest: Manifest, role: Role, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    spec = manifest.output(role)
    if spec is None or spec.name not in outputs:
        return None
    values = np.asarray(outputs[spec.name], dtype=np.float32)
    values = values.reshape(len(values), *values.shape[-2:])
    return activate(spec, values).astype(np.float64)


def raw_ratio(lungs: np.ndarray, heart: np.ndarray) -> float:
    """appliance.interpret.cardiac's ratio before its plausibility check (NaN: a mask is missing or the
    heart is not between the lungs), so that the distance to the plausibility limits is known too."""

    def extent(mask: np.ndarray) -> tuple[float, float] | None:
        columns = np.nonzero(mask)[1]
        if columns.size < MIN_PIXELS:
            return None
        low, high = np.percentile(columns, [1.0, 99.0])
        return float(low), float(high)

    thorax = extent(upsample(lungs.astype(np.float32), WORK_SIZE) >= MASK_THRESHOLD)
    cardiac = extent(upsample(heart.astype(np.float32), WORK_SIZE) >= MASK_THRESHOLD)
    if thorax is None or cardiac is None:
        return math.nan
    width = thorax[1] - thorax[0]
    centre = (cardiac[0] + cardiac[1]) / 2
    if width <= 0 or not thorax[0] < centre < thorax[1]:
        return math.nan
    return (cardiac[1] - cardiac[0]) / width


def values(score: Score, manifest: Manifest, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The score per image in decision units: (N,) for scalars, (N, C) for the view, (N, 6) for zones,
    (N, h, w) probabilities for maps."""
    if score.kind in ("logit", "value"):
        raw = np.asarray(outputs[score.output], dtype=np.float64)
        column = raw.reshape(len(raw), -1)[:, score.column]
        if score.kind == "logit":
            return np.clip(column, -LOGIT_CAP, LOGIT_CAP)
        if score.role == "severity":
            spec = _spec(manifest, score.output)
            return np.clip(
                column, *spec.ranges.get(score.label, SEVERITY_RANGES.get(score.label, (0.0, 8.0)))
            )
        return column
    if score.kind == "argmax":
        spec = _spec(manifest, score.output)
        raw = np.asarray(outputs[score.output], dtype=np.float64).reshape(len(outputs[score.output]), -1)
        logits = raw if spec.activation == "softmax" else np.log(np.clip(raw, 1e-12, None))
        # Log-odds against the top class, capped where the published 4-decimal score stops changing.
        return np.maximum(logits - logits.max(axis=1, keepdims=True), -LOGIT_CAP)
    if score.kind == "ctr":
        lungs, heart = _map(manifest, Role.lung_mask, outputs), _map(manifest, Role.heart_mask, outputs)
        assert lungs is not None and heart is not None
        return np.array([raw_ratio(lung, h) for lung, h in zip(lungs, heart, strict=True)])
    if score.kind == "zones":
        heat = _map(manifest, Role.heatmap, outputs)
        lungs = _map(manifest, Role.lung_mask, outputs)
        assert heat is not None
        mask_spec = manifest.output(Role.lung_mask)
        threshold = mask_spec.thresholds.get("lung", 0.5) if mask_spec else 0.5
        result = np.full((len(heat), len(ZONE_SLOTS)), np.nan)
        for i in range(len(heat)):
            lung = None if lungs is None else lungs[i]
            shares = lung_zones(lung_heat(heat[i], lung, threshold), lung, threshold, ZONE_MIN_INVOLVEMENT)
            for zone in shares:
                result[i, ZONE_SLOTS.index((zone.side, zone.level))] = zone.involvement
        return result
    role = {"lung_mask": Role.lung_mask, "heart_mask": Role.heart_mask}.get(score.key, Role.heatmap)
    found = _map(manifest, role, outputs)
    assert found is not None
    return found


def _mask_threshold(manifest: Manifest, score: Score) -> float:
    spec = _spec(manifest, score.output)
    return float(spec.thresholds.get("lung", spec.thresholds.get("heart", 0.5)))


def deviation(score: Score, ref: np.ndarray, cand: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per image |Δscore| (NaN where the score does not exist in one of them)."""
    if score.kind in ("logit", "value", "ctr"):
        return np.abs(cand - ref)
    if score.kind == "argmax":
        order = np.argsort(-ref, axis=1)
        rows = np.arange(len(ref))
        a, b = order[:, 0], order[:, 1]
        return np.abs((cand[rows, a] - cand[rows, b]) - (ref[rows, a] - ref[rows, b]))
    if score.kind == "zones":
        diff = np.abs(cand - ref)
        out = np.full(len(ref), np.nan)
        known = ~np.isnan(diff).all(axis=1)
        out[known] = np.nanmax(diff[known], axis=1)
        return out
    if score.kind == "mask":
        flat = lambda m: m.reshape(len(m), -1) >= threshold  # noqa: E731
        return (flat(ref) != flat(cand)).mean(axis=1).astype(np.float64)
    return np.abs(cand - ref).reshape(len(ref), -1).mean(axis=1)


def decisions(score: Score, vals: np.ndarray) -> np.ndarray:
    """(N, P) decisions, one column per operating point (zones: one per zone); -1/-2: no value."""
    if score.kind in ("logit", "value"):
        columns = [(vals > p.threshold) if p.strict else (vals >= p.threshold) for p in score.points]
        return np.stack(columns, axis=1).astype(int) if columns else np.zeros((len(vals), 0), int)
    if score.kind == "argmax":
        return vals.argmax(axis=1)[:, None]
    if score.kind == "ctr":
        point = score.points[0].threshold
        state = np.where(np.round(np.nan_to_num(vals), 2) >= point, 1, 0)
        state = np.where((vals < PLAUSIBLE[0]) | (vals > PLAUSIBLE[1]), -1, state)
        return np.where(np.isnan(vals), -2, state)[:, None]
    if score.kind == "zones":
        point = score.points[0].threshold
        return np.where(np.isnan(vals), -1, (np.nan_to_num(vals) >= point).astype(int))
    return np.zeros((len(vals), 0), int)


def distance(score: Score, ref: np.ndarray) -> np.ndarray:
    """(N, P) distance of the FP32 score to each operating point (inf: no value to measure from)."""
    if score.kind in ("logit", "value"):
        columns = [np.abs(ref - p.threshold) for p in score.points]
        return np.stack(columns, axis=1) if columns else np.zeros((len(ref), 0))
    if score.kind == "argmax":
        top = np.sort(ref, axis=1)
        return (top[:, -1] - top[:, -2])[:, None]
    if score.kind == "ctr":
        edges = [PLAUSIBLE[0], PLAUSIBLE[1], score.points[0].threshold]
        near = np.min(np.abs(ref[:, None] - np.asarray(edges)[None, :]), axis=1)
        return np.where(np.isnan(ref), np.inf, near)[:, None]
    if score.kind == "zones":
        return np.where(np.isnan(ref), np.inf, np.abs(ref - score.points[0].threshold))
    return np.zeros((len(ref), 0))


# --- ground truth ------------------------------------------------------------------------------------


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
        spec = _spec(manifest, score.output)
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
        spec = _spec(manifest, score.output)
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
        spec = _spec(manifest, score.output)
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
    threshold = _mask_threshold(manifest, score)
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


# --- noise ---------------------------------------------------------------------------------------------


def _stats(values_: np.ndarray) -> dict[str, float]:
    v = values_[~np.isnan(values_)]
    if not len(v):
        return {"n": 0}
    return {
        "n": len(v),
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
    }


def noise_stats(
    manifest: Manifest, reference: dict[str, np.ndarray], other: dict[str, np.ndarray], rows: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per score: |Δ| between the FP32 outputs of the gate's images (rows of `reference`) and `other`."""
    sub = {k: np.asarray(v)[rows] for k, v in reference.items()}
    result = {}
    for score in scores(manifest):
        threshold = _mask_threshold(manifest, score) if score.kind == "mask" else 0.5
        ref = values(score, manifest, sub)
        alt = values(score, manifest, other)
        result[score.key] = _stats(deviation(score, ref, alt, threshold))
    return result


@dataclass
class ReadingVariants:
    """The same images read two other ways: full-resolution decoding (only where that differs from the
    appliance's reduced-size decoding) and a JPEG re-encoding of the decoded pixels."""

    full: np.ndarray
    full_rows: np.ndarray
    reencoded: np.ndarray


def reading_variants(
    data: Path, records: Sequence[dataset.Record], manifest: Manifest, quality: int = JPEG_QUALITY
) -> ReadingVariants:
    from appliance.ingest import read_image

    size = max(manifest.input.height, manifest.input.width)
    full, rows, reencoded = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy.jpg"
        for i, record in enumerate(records):
            path = data / record.file
            try:
                fast = read_image(path, target_size=size).pixels
                whole = read_image(path, target_size=None).pixels
            except InputRejected as exc:
                raise UserError(f"{path}: {exc}") from exc
            if fast.shape != whole.shape or not np.array_equal(fast, whole):
                full.append(preprocess(whole, manifest.input)[0])
                rows.append(i)
            grey = Image.fromarray(np.clip(np.round(whole * 255), 0, 255).astype(np.uint8), mode="L")
            buffer = io.BytesIO()
            grey.save(buffer, format="JPEG", quality=quality)
            copy.write_bytes(buffer.getvalue())
            reencoded.append(preprocess(read_image(copy, target_size=size).pixels, manifest.input)[0])
    shape = (0, *np.shape(reencoded[0])) if reencoded else (0,)
    return ReadingVariants(
        np.stack(full) if full else np.zeros(shape, np.float32),
        np.asarray(rows, dtype=int),
        np.stack(reencoded) if reencoded else np.zeros(shape, np.float32),
    )


def measure_noise(
    manifest: Manifest,
    inputs: np.ndarray,
    reference: dict[str, np.ndarray],
    variants: ReadingVariants,
    run_reference: Runner,
    run_other_config: Runner,
) -> dict[str, Any]:
    """FP32 score noise on the gate's images, per score and source (see docs/parity.md)."""
    everything = np.arange(len(inputs))
    sources: dict[str, Any] = {
        "runtime": {
            "what": "FP32 again with another thread count and batch size (same tensors)",
            "n_images": len(inputs),
            "scores": noise_stats(manifest, reference, run_other_config(inputs), everything),
        },
        "decode": {
            "what": "FP32 on the full-resolution decode vs the appliance's reduced-size (DCT-scaled) decode,"
            " on the images where the two reads differ",
            "n_images": len(variants.full_rows),
            "scores": noise_stats(manifest, reference, run_reference(variants.full), variants.full_rows)
            if len(variants.full_rows)
            else {},
        },
        "reencode": {
            "what": f"FP32 on the same pixels re-encoded as JPEG quality {JPEG_QUALITY} (a PACS export)",
            "n_images": len(inputs),
            "scores": noise_stats(manifest, reference, run_reference(variants.reencoded), everything),
        },
    }
    source = BAND_SOURCE if len(variants.full_rows) >= MIN_NOISE_IMAGES else "reencode"
    bands = {
        key: {
            "band": stats.get("max", 0.0),
            "p99": stats.get("p99", 0.0),
            "mean": stats.get("mean", 0.0),
            "source": source,
            "n": stats.get("n", 0),
        }
        for key, stats in sources[source]["scores"].items()
    }
    rows = variants.full_rows if source == BAND_SOURCE else everything
    return {"sources": sources, "band_source": source, "bands": bands, "band_rows": [int(r) for r in rows]}


def fingerprint(manifest: Manifest, records: Sequence[dataset.Record]) -> dict[str, str]:
    files = "\n".join(r.file for r in records).encode()
    return {
        "noise_version": str(NOISE_VERSION),
        "fp32_sha256": sha256_file(manifest.onnx_path(Precision.fp32)),
        "images_sha256": hashlib.sha256(files).hexdigest(),
    }


def load_or_measure_noise(
    manifest: Manifest,
    data: Path,
    records: Sequence[dataset.Record],
    inputs: np.ndarray,
    reference: dict[str, np.ndarray],
    run_reference: Runner,
    run_other_config: Runner,
    path: Path | None = None,
) -> dict[str, Any]:
    """The noise for this FP32 model and image set from <model>/parity_noise.json, measured if stale."""
    path = path or manifest.folder / NOISE_FILE
    key = fingerprint(manifest, records)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == key:
                return dict(stored)
        except ValueError:
            pass
    variants = reading_variants(data, records, manifest)
    noise = measure_noise(manifest, inputs, reference, variants, run_reference, run_other_config)
    noise["fingerprint"] = key
    try:
        path.write_text(json.dumps(noise, indent=1) + "\n")
    except OSError as exc:  # a read-only model folder on a cart: measured again next time
        print(f"note: noise not stored ({exc})", file=sys.stderr)
    return noise


# --- the gate ----------------------------------------------------------------------------------------


def judge(
    manifest: Manifest,
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    noise: dict[str, Any] | None,
    known: Truth | None = None,
) -> dict[str, Any]:
    """The verdict: one row per score (gated or reported), the flat list of checks, passed.

    `noise` is measure_noise's result (its "bands", and "band_rows": the images the band was measured
    on, where the candidate's deviation is compared with the noise pairwise); None: no noise known, every
    band 0 (any deviation fails)."""
    bands = (noise or {}).get("bands", {})
    paired = (noise or {}).get("band_rows")
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for score in scores(manifest):
        if score.output not in candidate:
            rows.append({"key": score.key, "gated": score.gated, "missing": True})
            checks.append(
                {"check": f"{score.key}: output present", "value": None, "limit": None, "ok": False}
            )
            continue
        threshold = _mask_threshold(manifest, score) if score.kind == "mask" else 0.5
        ref, cand = values(score, manifest, reference), values(score, manifest, candidate)
        diff = deviation(score, ref, cand, threshold)
        known_diff = diff[~np.isnan(diff)]
        noise = bands.get(score.key, {"band": 0.0, "p99": 0.0, "mean": 0.0, "source": "none", "n": 0})
        band = float(noise["band"])
        noise_p99 = float(noise.get("p99", band))
        row: dict[str, Any] = {
            "key": score.key,
            "output": score.output,
            "unit": score.unit,
            "gated": score.gated,
            "n": len(ref),
            "max_abs": float(known_diff.max()) if len(known_diff) else None,
            "mean_abs": float(known_diff.mean()) if len(known_diff) else None,
            "p99_abs": float(np.percentile(known_diff, DEVIATION_PERCENTILE)) if len(known_diff) else None,
            "band": band,
            "noise_p99": noise_p99,
            "noise_mean": float(noise["mean"]),
            "noise_source": noise["source"],
            "points": [],
        }
        if score.kind == "logit":
            p_ref, p_cand = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-cand))
            row["max_abs_probability"] = float(np.abs(p_cand - p_ref).max())
        own: list[dict[str, Any]] = []
        acc = accuracy(score, manifest, known, ref, cand)
        if acc is not None:
            acc["delta"] = abs(acc["candidate"] - acc["fp32"])
            acc["ok"] = acc["delta"] <= acc["limit"]
            row["accuracy"] = acc
            own.append(
                {
                    "check": f"{score.key}: |Δ{acc['metric']}|",
                    "value": acc["delta"],
                    "limit": acc["limit"],
                    "ok": acc["ok"],
                }
            )
        if paired is not None and len(paired):
            same = diff[np.asarray(paired, dtype=int)]
            same = same[~np.isnan(same)]
            if len(same):
                row["paired_p99_abs"] = float(np.percentile(same, DEVIATION_PERCENTILE))
                row["paired_mean_abs"] = float(same.mean())
                own.append(
                    {
                        "check": f"{score.key}: p99 |Δ| <= reading noise p99 (same images)",
                        "value": row["paired_p99_abs"],
                        "limit": noise_p99,
                        "ok": row["paired_p99_abs"] <= noise_p99,
                    }
                )
                own.append(
                    {
                        "check": f"{score.key}: mean |Δ| <= reading noise mean (same images)",
                        "value": row["paired_mean_abs"],
                        "limit": row["noise_mean"],
                        "ok": row["paired_mean_abs"] <= row["noise_mean"],
                    }
                )
        if row["p99_abs"] is not None:
            own.append(
                {
                    "check": f"{score.key}: p99 |Δ| over all images <= reading noise p99",
                    "value": row["p99_abs"],
                    "limit": noise_p99,
                    "ok": row["p99_abs"] <= noise_p99,
                }
            )
        if score.points:
            ref_d, cand_d = decisions(score, ref), decisions(score, cand)
            dist = distance(score, ref)
            for j, point in enumerate(score.points if score.kind != "zones" else score.points[:1]):
                cols = slice(None) if score.kind == "zones" else slice(j, j + 1)
                flipped = ref_d[:, cols] != cand_d[:, cols]
                inside = dist[:, cols] <= band
                entry = {
                    "point": point.name,
                    "threshold": point.threshold,
                    "inside_band": int((flipped & inside).sum()),
                    "outside_band": int((flipped & ~inside).sum()),
                    "beyond_noise_p99": int((flipped & (dist[:, cols] > noise_p99)).sum()),
                    "outside_rows": [int(i) for i in np.flatnonzero((flipped & ~inside).any(axis=1))[:20]],
                    "near_point": int(inside.sum()),
                }
                row["points"].append(entry)
                own.append(
                    {
                        "check": f"{score.key}: flips outside the band at {point.name}",
                        "value": entry["outside_band"],
                        "limit": 0,
                        "ok": entry["outside_band"] == 0,
                        "inside_band": entry["inside_band"],
                    }
                )
        row["ok"] = all(c["ok"] for c in own)
        for check in own:
            check["gated"] = score.gated
        rows.append(row)
        checks += own
    extra = {
        name: float(np.abs(np.asarray(candidate[name], np.float64) - np.asarray(ref_v, np.float64)).max())
        for name, ref_v in reference.items()
        if name in candidate
    }
    return {
        "passed": all(c["ok"] for c in checks if c.get("gated", True)),
        "n_images": len(next(iter(reference.values()))),
        "checks": [c for c in checks if c.get("gated", True)],
        "reported_only": [c for c in checks if not c.get("gated", True)],
        "scores": rows,
        "max_abs_diff": extra,
    }


def markdown(report: dict[str, Any], title: str, noise: dict[str, Any] | None = None) -> str:
    """The report as tables: one row per published score, then the noise it was judged against."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"# {title} — {verdict}",
        "",
        f"{report['n_images']} validation images. Rule: docs/parity.md. Units: logit for sigmoid outputs,"
        " points for severity, log-odds margin for the view, ratio, involvement share, pixel fraction.",
        "",
        "| score | gated | ΔAUC/ΔMAE/ΔDice (limit) | max abs Δ | mean abs Δ | p99 abs Δ (noise p99) |"
        " same images: mean / p99 abs Δ (noise mean / p99) | band | flips in band (beyond noise p99) / outside |"
        " ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, digits: int = 4) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    for row in report["scores"]:
        if row.get("missing"):
            lines.append(
                f"| {row['key']} | {'yes' if row['gated'] else 'no'} | output missing | | | | | | NO |"
            )
            continue
        acc = row.get("accuracy")
        acc_text = (
            f"{acc['metric']} {acc['fp32']:.4f}→{acc['candidate']:.4f}: {acc['delta']:.4f} ({acc['limit']:.3g})"
            if acc
            else "no labels"
        )
        flips = (
            ", ".join(
                f"{p['point']} {p['inside_band']} ({p['beyond_noise_p99']})/{p['outside_band']}"
                for p in row["points"]
            )
            or "-"
        )
        paired = (
            f"{f(row.get('paired_mean_abs'))} / {f(row.get('paired_p99_abs'))}"
            f" ({f(row['noise_mean'])} / {f(row['noise_p99'])})"
        )
        lines.append(
            f"| {row['key']} | {'yes' if row['gated'] else 'no'} | {acc_text} | {f(row['max_abs'])} |"
            f" {f(row['mean_abs'])} | {f(row['p99_abs'])} ({f(row['noise_p99'])}) | {paired} |"
            f" {f(row['band'])} | {flips} | {'yes' if row['ok'] else 'NO'} |"
        )
    failed = [c for c in report["checks"] if not c["ok"]]
    if failed:
        lines += ["", "Failed checks:", ""]
        lines += [f"- {c['check']}: {c['value']} (limit {c['limit']})" for c in failed]
    if noise is not None:
        lines += ["", noise_markdown(noise)]
    return "\n".join(lines) + "\n"


def noise_markdown(noise: dict[str, Any]) -> str:
    lines = [
        f"## FP32 score noise (band = the largest |Δ| of the '{noise['band_source']}' source;"
        " deviation bound = its p99 and mean)",
        "",
    ]
    for name, source in noise["sources"].items():
        lines += [f"- {name}: {source['what']} ({source['n_images']} images)"]
    lines += ["", "| score | " + " | ".join(f"{n} p50 / p99 / max" for n in noise["sources"]) + " |"]
    lines += ["|---|" + "---|" * len(noise["sources"])]
    keys = list(noise["bands"]) or list(next(iter(noise["sources"].values()))["scores"])
    for key in keys:
        cells = []
        for source in noise["sources"].values():
            s = source["scores"].get(key, {})
            cells.append(f"{s['p50']:.4g} / {s['p99']:.4g} / {s['max']:.4g}" if s.get("n") else "n/a")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- CLI: measure and print the noise --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["noise"])
    parser.add_argument("--model", type=Path, default=dataset.REPO / "engines" / "cxr-lite0")
    parser.add_argument("--data", help="data folder (default $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--limit", type=int, help="at most this many validation images")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the reference")
    args = parser.parse_args(argv)
    from appliance.errors import ApplianceError
    from appliance.manifest import load_manifest
    from tools.engines import quantize

    try:
        manifest = load_manifest(args.model)
        folder = dataset.data_dir(args.data)
        records, inputs = quantize.split_tensors(folder, manifest, "validation", args.limit)
        fp32 = manifest.onnx_path(Precision.fp32)
        name = manifest.input.name
        reference = quantize.run(fp32, inputs, name, threads=args.threads)
        noise = load_or_measure_noise(
            manifest,
            folder,
            records,
            inputs,
            reference,
            lambda x: quantize.run(fp32, x, name, threads=args.threads),
            lambda x: quantize.run(fp32, x, name, batch=1, threads=args.threads + 1),
        )
    except (UserError, ApplianceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(noise_markdown(noise))
    return 0


if __name__ == "__main__":
    sys.exit(main())
