"""One image's model outputs -> a Reading: refusal, triage, findings, severity, risk, zones, heatmap, text."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from appliance.image import ImageMeta
from appliance.interpret import text
from appliance.interpret.activation import columns
from appliance.interpret.gate import Refusal
from appliance.interpret.zones import lung_zones
from appliance.manifest import Manifest, Role
from appliance.preprocess import Geometry, unfit
from appliance.result import Finding, Heatmap, Risk, Score, Sentence, Severity, Status, TriageLevel, Zone

HEATMAP_MAX_SIDE = 64  # a few kB of PNG: small enough for every MQTT message
ZONE_MIN_INVOLVEMENT = 0.2


@dataclass
class Reading:
    status: Status
    reason: str | None = None
    triage: TriageLevel | None = None
    view: Finding | None = None
    ood: Score | None = None
    abnormal: Score | None = None
    findings: list[Finding] = field(default_factory=list)
    severity: Severity | None = None
    risk: Risk | None = None
    zones: list[Zone] = field(default_factory=list)
    heatmap: Heatmap | None = None
    sentences: list[Sentence] = field(default_factory=list)

    def payload_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def refused(
    refusal: Refusal, meta: ImageMeta, view: Finding | None = None, ood: Score | None = None
) -> Reading:
    sentences = [
        text.refusal_sentence(refusal.reason, refusal.detail, refusal.source),
        text.disclaimer_sentence(),
    ]
    return Reading(status="refused", reason=refusal.reason, view=view, ood=ood, sentences=sentences)


def errored(reason: str, detail: str) -> Reading:
    sentence = Sentence(text=f"Not read: {reason} ({detail}).", source="error")
    return Reading(status="error", reason=reason, sentences=[sentence, text.disclaimer_sentence()])


def _scalar(
    manifest: Manifest, outputs: dict[str, np.ndarray], role: Role
) -> tuple[float, float | None] | None:
    spec = manifest.output(role)
    if spec is None:
        return None
    label, values = next(iter(columns(spec, outputs[spec.name][None]).items()))
    return float(values[0]), spec.thresholds.get(label)


def _view(manifest: Manifest, outputs: dict[str, np.ndarray]) -> tuple[Finding | None, Refusal | None]:
    spec = manifest.output(Role.view)
    if spec is None:
        return None, None
    scores = {label: float(v[0]) for label, v in columns(spec, outputs[spec.name][None]).items()}
    label = max(scores, key=lambda k: scores[k])
    view = Finding(label=label, score=round(scores[label], 4), threshold=None, positive=True)
    if label in spec.refuse_labels:
        return view, Refusal(spec.refuse_labels[label], f"{label} score {scores[label]:.2f}", f"view.{label}")
    return view, None


def _ood(manifest: Manifest, outputs: dict[str, np.ndarray]) -> tuple[Score | None, Refusal | None]:
    value = _scalar(manifest, outputs, Role.ood)
    if value is None:
        return None, None
    score, threshold = value
    positive = threshold is not None and score > threshold
    ood = Score(score=round(score, 4), threshold=threshold, positive=positive)
    if positive:
        return ood, Refusal(
            "not a chest X-ray", f"out-of-distribution score {score:.1f} > {threshold:.1f}", "ood"
        )
    return ood, None


def _findings(manifest: Manifest, outputs: dict[str, np.ndarray]) -> list[Finding]:
    spec = manifest.output(Role.findings)
    if spec is None:
        return []
    found = []
    for label, values in columns(spec, outputs[spec.name][None]).items():
        score = float(values[0])
        threshold = spec.thresholds.get(label, 0.5)
        found.append(
            Finding(label=label, score=round(score, 4), threshold=threshold, positive=score >= threshold)
        )
    return found


def _abnormal(manifest: Manifest, outputs: dict[str, np.ndarray], findings: list[Finding]) -> Score | None:
    threshold = manifest.triage.abnormal_threshold
    value = _scalar(manifest, outputs, Role.abnormal)
    if value is not None:
        score, own_threshold = value
        threshold = threshold if threshold is not None else own_threshold
    else:
        # No abnormal head (a brought-in model): 1 - P(normal) when the findings name a normal label.
        normal_label = spec.normal_label if (spec := manifest.output(Role.findings)) else None
        normal = next((f for f in findings if f.label == normal_label), None)
        if normal is None:
            return None
        score = 1.0 - normal.score
    threshold = 0.5 if threshold is None else threshold
    return Score(score=round(score, 4), threshold=threshold, positive=score >= threshold)


def _severity(manifest: Manifest, outputs: dict[str, np.ndarray]) -> Severity | None:
    spec = manifest.output(Role.severity)
    if spec is None:
        return None
    values = {label: float(v[0]) for label, v in columns(spec, outputs[spec.name][None]).items()}
    extent_range = spec.ranges.get("extent", (0.0, 8.0))
    opacity_range = spec.ranges.get("opacity", (0.0, 6.0))
    extent = float(np.clip(values.get("extent", 0.0), *extent_range))
    opacity = float(np.clip(values.get("opacity", 0.0), *opacity_range))
    return Severity(
        extent=round(extent, 2),
        extent_max=extent_range[1],
        opacity=round(opacity, 2),
        opacity_max=opacity_range[1],
    )


def _risk(manifest: Manifest, outputs: dict[str, np.ndarray]) -> Risk | None:
    value = _scalar(manifest, outputs, Role.risk)
    if value is None:
        return None
    score, threshold = value
    return Risk(
        score=round(score, 4), threshold=threshold, positive=None if threshold is None else score >= threshold
    )


def _map(
    manifest: Manifest, outputs: dict[str, np.ndarray], role: Role, geometry: Geometry
) -> np.ndarray | None:
    spec = manifest.output(role)
    if spec is None:
        return None
    values = outputs[spec.name]
    values = values.reshape(values.shape[-2:])
    if spec.activation == "sigmoid":
        values = 1.0 / (1.0 + np.exp(-np.clip(values, -60, 60)))
    return unfit(values.astype(np.float32), geometry, manifest.input)


def heatmap_png(heatmap: np.ndarray, label: str) -> Heatmap:
    scale = HEATMAP_MAX_SIDE / max(heatmap.shape)
    size = (max(1, round(heatmap.shape[1] * scale)), max(1, round(heatmap.shape[0] * scale)))
    grey = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), mode="L").resize(
        size, Image.Resampling.BILINEAR
    )
    buffer = io.BytesIO()
    grey.save(buffer, format="PNG", optimize=True)
    return Heatmap(
        label=label, width=size[0], height=size[1], png_base64=base64.b64encode(buffer.getvalue()).decode()
    )


def _triage(
    manifest: Manifest,
    abnormal: Score | None,
    findings: list[Finding],
    severity: Severity | None,
    risk: Risk | None,
    normal_label: str | None,
) -> TriageLevel:
    policy = manifest.triage
    urgent = (
        (
            abnormal is not None
            and policy.urgent_threshold is not None
            and abnormal.score >= policy.urgent_threshold
        )
        or (
            severity is not None
            and policy.urgent_extent is not None
            and severity.extent >= policy.urgent_extent
        )
        or (risk is not None and policy.urgent_risk is not None and risk.score >= policy.urgent_risk)
    )
    if urgent:
        return "urgent"
    if abnormal is not None:
        return "abnormal" if abnormal.positive else "normal"
    return "abnormal" if any(f.positive and f.label != normal_label for f in findings) else "normal"


def read_outputs(
    manifest: Manifest,
    outputs: dict[str, np.ndarray],
    geometry: Geometry,
    meta: ImageMeta,
    *,
    with_heatmap: bool,
) -> Reading:
    """Interpret one image's outputs (batch axis already removed)."""
    view, view_refusal = _view(manifest, outputs)
    ood, ood_refusal = _ood(manifest, outputs)
    # A lateral flagged by the view head is the more specific reason; otherwise the OOD guard.
    refusal = view_refusal or ood_refusal
    if refusal is not None:
        return refused(refusal, meta, view=view, ood=ood)
    findings = _findings(manifest, outputs)
    findings_spec = manifest.output(Role.findings)
    normal_label = findings_spec.normal_label if findings_spec else None
    abnormal = _abnormal(manifest, outputs, findings)
    severity = _severity(manifest, outputs)
    risk = _risk(manifest, outputs)
    heat = _map(manifest, outputs, Role.heatmap, geometry)
    lungs = _map(manifest, outputs, Role.lung_mask, geometry)
    zones: list[Zone] = []
    heatmap = None
    if heat is not None:
        mask_spec = manifest.output(Role.lung_mask)
        lung_threshold = mask_spec.thresholds.get("lung", 0.5) if mask_spec else 0.5
        zones = lung_zones(heat, lungs, lung_threshold, ZONE_MIN_INVOLVEMENT)
        if with_heatmap:
            heatmap = heatmap_png(heat, manifest.heatmap_label or "abnormal")
    sentences = [
        s
        for s in (
            text.view_sentence(meta, view),
            *text.findings_sentences(abnormal, findings, normal_label, severity, zones),
            text.risk_sentence(risk),
            text.disclaimer_sentence(),
        )
        if s is not None
    ]
    return Reading(
        status="ok",
        triage=_triage(manifest, abnormal, findings, severity, risk, normal_label),
        view=view,
        ood=ood,
        abnormal=abnormal,
        findings=findings,
        severity=severity,
        risk=risk,
        zones=zones,
        heatmap=heatmap,
        sentences=sentences,
    )
