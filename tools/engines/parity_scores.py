"""What the parity gate compares (the rule: tools/engines/parity_gate.py, docs/parity.md).

Every score the appliance publishes or decides on, taken from a manifest with its operating points, and
per image: its value in decision units (as published: capped logits, clipped severity, the view's
log-odds margin, the cardiothoracic ratio, the zones' involvement, mask probabilities), the |Δ| between
two runs, the decision at each operating point and the distance to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from appliance.interpret.activation import activate
from appliance.interpret.cardiac import PLAUSIBLE, heart_and_thorax_widths
from appliance.interpret.reading import ZONE_MIN_INVOLVEMENT, lung_heat
from appliance.interpret.zones import lung_zones
from appliance.manifest import Manifest, OutputSpec, Role

# Scores are published rounded to 4 decimals: beyond logit(1 - 0.5e-4) = 9.90 a sigmoid score reads 1.0000
# (and 0.0000 below -9.90), so logits are compared capped there. Severity is published clipped to its range.
LOGIT_CAP = math.log((1 - 0.5e-4) / 0.5e-4)
SEVERITY_RANGES = {"extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
ZONE_SLOTS = [(side, level) for side in ("right", "left") for level in ("upper", "middle", "lower")]

Kind = Literal["logit", "value", "argmax", "ctr", "zones", "mask", "heatmap"]


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


def output_spec(manifest: Manifest, name: str) -> OutputSpec:
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
    widths = heart_and_thorax_widths(lungs, heart)
    return math.nan if widths is None else widths[0] / widths[1]


def values(score: Score, manifest: Manifest, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The score per image in decision units: (N,) for scalars, (N, C) for the view, (N, 6) for zones,
    (N, h, w) probabilities for maps."""
    if score.kind in ("logit", "value"):
        raw = np.asarray(outputs[score.output], dtype=np.float64)
        column = raw.reshape(len(raw), -1)[:, score.column]
        if score.kind == "logit":
            return np.clip(column, -LOGIT_CAP, LOGIT_CAP)
        if score.role == "severity":
            spec = output_spec(manifest, score.output)
            return np.clip(
                column, *spec.ranges.get(score.label, SEVERITY_RANGES.get(score.label, (0.0, 8.0)))
            )
        return column
    if score.kind == "argmax":
        spec = output_spec(manifest, score.output)
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


def mask_threshold(manifest: Manifest, score: Score) -> float:
    spec = output_spec(manifest, score.output)
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
