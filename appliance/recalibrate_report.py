"""Recalibration's report: per output, the chosen site point or why it was refused, with
sensitivity and specificity at the shipped and the site point and bootstrap 95 % intervals over
patients; written as JSON and as Markdown next to the overlay."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from appliance import NOT_FOR_DIAGNOSTIC_USE
from appliance.interpret.quoting import SCORE_DECIMALS
from appliance.manifest import Manifest
from appliance.operating_points import (
    bootstrap_ci,
    sensitivity,
    specificity,
    threshold_at_sensitivity,
    threshold_at_specificity,
)
from appliance.overlay import ABNORMAL, Target, shipped_threshold, unpublishable
from appliance.recalibrate_cases import Case

# With 20 positives one missed case moves sensitivity by 5 points and the 95 % interval of a 0.95
# sensitivity still spans about 0.75-0.99: fewer cases choose a point by noise, not by the site.
MIN_CASES = 20
BOOTSTRAP_RESAMPLES = 2000

Metric = Callable[[np.ndarray, np.ndarray, float], float | None]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def figures(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at `threshold` with patient-bootstrap 95 % intervals."""
    out: dict[str, Any] = {"threshold": threshold}
    for name, metric in (("sensitivity", sensitivity), ("specificity", specificity)):

        def resampled(idx: np.ndarray, metric: Metric = metric) -> float | None:
            return metric(labels[idx], scores[idx], threshold)

        out[name] = _rounded(metric(labels, scores, threshold))
        ci = bootstrap_ci(groups, resampled, BOOTSTRAP_RESAMPLES)
        out[f"{name}_ci"] = [round(v, 4) for v in ci] if ci else None
    return out


def assess(key: str, cases: list[Case], manifest: Manifest, target: Target) -> dict[str, Any]:
    """One output's report entry: refused with the reason, or the chosen site point."""
    labelled = [c.labels[key] for c in cases if key in c.labels]
    entry: dict[str, Any] = {
        "output": key,
        "positives": sum(labelled),
        "negatives": len(labelled) - sum(labelled),
    }
    if problem := unpublishable(manifest, key):
        return {**entry, "status": "refused", "reason": f"{problem}; recalibration never publishes an output"}
    if entry["positives"] < MIN_CASES or entry["negatives"] < MIN_CASES:
        return {
            **entry,
            "status": "refused",
            "reason": f"too few cases: {entry['positives']} positive and {entry['negatives']} negative;"
            f" at least {MIN_CASES} of each are needed",
        }
    # A read image carries every published score, so each labelled case is scored here.
    scored = [c for c in cases if key in c.labels and key in c.scores]
    labels = np.array([c.labels[key] for c in scored], dtype=int)
    # As the cart publishes and decides on them (4 decimals, appliance/interpret/quoting.py): the site's
    # figures are then exactly what the cart will do.
    scores = np.round(np.array([c.scores[key] for c in scored], dtype=np.float64), SCORE_DECIMALS)
    groups = np.array([c.group for c in scored])
    choose = threshold_at_sensitivity if target.metric == "sensitivity" else threshold_at_specificity
    # A published point (4 decimals) with the same decisions on published scores: the midpoint between
    # two of them becomes the upper one (score >= point), which no score lies between.
    step = 10**SCORE_DECIMALS
    chosen = math.ceil(round(choose(labels, scores, target.value) * step, 6)) / step
    urgent = manifest.triage.urgent_threshold
    if key == ABNORMAL and urgent is not None and chosen > urgent:
        return {
            **entry,
            "status": "refused",
            "reason": f"the chosen point {chosen:.4f} lies above the urgent point {urgent}, which is not"
            " recalibrated",
        }
    shipped = shipped_threshold(manifest, key)
    return {
        **entry,
        "status": "recalibrated",
        "shipped": figures(labels, scores, groups, shipped) if shipped is not None else None,
        "site": figures(labels, scores, groups, chosen),
    }


def _interval(values: list[float] | None) -> str:
    return f"{values[0]:.2f}–{values[1]:.2f}" if values else "n/a"


def _point(name: str, fig: dict[str, Any]) -> str:
    def value(metric: str) -> str:
        v = fig[metric]
        return "n/a" if v is None else f"{v:.2f} ({_interval(fig[f'{metric}_ci'])})"

    return f"| {name} | {fig['threshold']:.6g} | {value('sensitivity')} | {value('specificity')} |"


def markdown(report: dict[str, Any]) -> str:
    target = report["target"]
    intake = report["cases"]
    lines = [
        "# Site recalibration report",
        "",
        f"{NOT_FOR_DIAGNOSTIC_USE}. Written by `cxr-appliance recalibrate` at {report['created_at']}.",
        "",
        f"- Overlay: `{report['overlay']}`, id `{report['overlay_id']}`",
        f"- Model: {report['model']} {report['model_version']}, manifest sha256 `{report['manifest_sha256']}`",
        f"- Labels: {report['source']}",
        f"- Cases used: {intake['used']}; left out: {intake['left_out'] or 'none'}",
        f"- Target: {target['metric']} at least {target['value']} for every recalibrated output",
        f"- Intervals: 95 % percentile bootstrap, {report['bootstrap_resamples']} resamples of patients"
        " (of cases where the patient is unknown)",
        f"- Minimum: {MIN_CASES} positive and {MIN_CASES} negative cases per output",
        "",
    ]
    for entry in report["outputs"]:
        lines += [f"## {entry['output']}: {entry['status']}", ""]
        lines.append(f"{entry['positives']} positive, {entry['negatives']} negative cases.")
        if entry["status"] != "recalibrated":
            lines += ["", f"Not changed: {entry['reason']}.", ""]
            continue
        lines += [
            "",
            "| point | threshold | sensitivity (95 % CI) | specificity (95 % CI) |",
            "|---|---|---|---|",
        ]
        if entry["shipped"] is not None:
            lines.append(_point("shipped", entry["shipped"]))
        lines += [_point("site", entry["site"]), ""]
    lines += ["## Caveats", "", *(f"- {c}" for c in report["caveats"])]
    return "\n".join(lines) + "\n"


def report_paths(overlay: Path) -> tuple[Path, Path]:
    stem = overlay.with_suffix("")
    return stem.with_name(stem.name + ".report.md"), stem.with_name(stem.name + ".report.json")


def write_report(report: dict[str, Any], overlay: Path) -> None:
    """Markdown for people and JSON for tools, next to the overlay."""
    md_path, json_path = report_paths(overlay)
    md_path.write_text(markdown(report), encoding="utf-8")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
