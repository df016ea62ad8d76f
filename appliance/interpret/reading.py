"""One image's model outputs -> a Reading: refusal, triage, findings, severity, risk, zones, heatmap, text."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from appliance.image import ImageMeta
from appliance.interpret import decisions, text
from appliance.interpret.activation import columns, sigmoid
from appliance.interpret.cardiac import cardiothoracic_ratio
from appliance.interpret.gate import Refusal
from appliance.interpret.quoting import SEVERITY_DECIMALS, decide, decimals_for
from appliance.interpret.thumbnail import ThumbnailImage, render, thorax_box
from appliance.interpret.zones import lung_zones
from appliance.manifest import Manifest, Role
from appliance.preprocess import Geometry, unfit
from appliance.result import (
    CardiacSize,
    Finding,
    Heatmap,
    Risk,
    Score,
    Sentence,
    Severity,
    Status,
    TriageLevel,
    Zone,
)

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
    heatmap: Heatmap | None = None  # the 64-px PNG: MQTT's rendering of `heat`, when it publishes one
    cardiac: CardiacSize | None = None
    not_assessed: list[str] = field(default_factory=list)
    sentences: list[Sentence] = field(default_factory=list)
    # Published on its own retained topic, never inside the Result (see interpret/thumbnail.py).
    thumbnail: ThumbnailImage | None = None
    thumbnail_skipped: str | None = None  # why there is none, for the log
    # The full float heatmap (image content region, [0, 1]) whenever it may be shown at all (validated
    # localisation, a reading that is not normal), whatever MQTT publishes: the DICOM SC draws this one.
    heat: np.ndarray | None = None
    heat_label: str | None = None

    def payload_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in _NOT_IN_RESULT}


_NOT_IN_RESULT = frozenset({"thumbnail", "thumbnail_skipped", "heat", "heat_label"})


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
    score, threshold, positive = decide(*value, strict=True)
    ood = Score(score=score, threshold=threshold, positive=bool(positive))
    if positive and threshold is not None:
        places = decimals_for(score, [threshold], least=1)
        return ood, Refusal(
            "not a chest X-ray",
            f"out-of-distribution score {score:.{places}f} > {threshold:.{places}f}",
            "ood",
        )
    return ood, None


def _findings(manifest: Manifest, outputs: dict[str, np.ndarray]) -> list[Finding]:
    spec = manifest.output(Role.findings)
    if spec is None:
        return []
    found = []
    for label, values in columns(spec, outputs[spec.name][None]).items():
        if label == spec.normal_label or not spec.is_published(label):
            continue  # "no finding" is a decision (decisions.py), and unvalidated labels are not published
        score, threshold, positive = decide(float(values[0]), spec.thresholds.get(label, 0.5))
        found.append(Finding(label=label, score=score, threshold=threshold, positive=positive))
    return found


def _abnormal(manifest: Manifest, outputs: dict[str, np.ndarray]) -> Score | None:
    threshold = manifest.triage.abnormal_threshold
    value = _scalar(manifest, outputs, Role.abnormal)
    if value is not None:
        score, own_threshold = value
        threshold = threshold if threshold is not None else own_threshold
    else:
        # No abnormal head (a brought-in model): 1 - P(normal) when the findings name a normal label.
        spec = manifest.output(Role.findings)
        if spec is None or spec.normal_label is None:
            return None
        score = 1.0 - float(columns(spec, outputs[spec.name][None])[spec.normal_label][0])
    score, point, positive = decide(score, 0.5 if threshold is None else threshold)
    return Score(score=score, threshold=point, positive=positive)


def _severity(manifest: Manifest, outputs: dict[str, np.ndarray]) -> Severity | None:
    spec = manifest.output(Role.severity)
    if spec is None:
        return None
    values = {label: float(v[0]) for label, v in columns(spec, outputs[spec.name][None]).items()}
    measured: dict[str, float | None] = {}
    for label, default_max in (("extent", 8.0), ("opacity", 6.0)):
        low, high = spec.ranges.get(label, (0.0, default_max))
        published = label in values and spec.is_published(label)
        measured[label] = (
            round(float(np.clip(values[label], low, high)), SEVERITY_DECIMALS) if published else None
        )
        measured[f"{label}_max"] = high
    if measured["extent"] is None and measured["opacity"] is None:
        return None
    return Severity.model_validate(measured)


def _risk(manifest: Manifest, outputs: dict[str, np.ndarray]) -> Risk | None:
    spec = manifest.output(Role.risk)
    if spec is None or not spec.all_published():
        return None
    value = _scalar(manifest, outputs, Role.risk)
    if value is None:
        return None
    score, threshold, positive = decide(*value)
    return Risk(score=score, threshold=threshold, positive=positive)


def _cardiac(
    manifest: Manifest,
    outputs: dict[str, np.ndarray],
    geometry: Geometry,
    lungs: np.ndarray | None,
    meta: ImageMeta,
) -> tuple[CardiacSize | None, str]:
    """The ratio only from a manifest that validated it (a model without a record never states it)."""
    spec = manifest.output(Role.heart_mask)
    if spec is None or spec.published is None or "cardiothoracic_ratio" not in spec.published:
        return None, "not assessed"
    heart = _map(manifest, outputs, Role.heart_mask, geometry)
    measured = cardiothoracic_ratio(lungs, heart) if lungs is not None and heart is not None else None
    if measured is None:
        return None, "unmeasurable"
    threshold = manifest.triage.cardiomegaly_ratio
    ratio = round(measured.ratio, 2)
    return (
        CardiacSize(
            ratio=ratio,
            threshold=threshold,
            enlarged=ratio >= threshold,
            projection_caveat=(meta.view_position or "").upper() == "AP",
        ),
        "published",
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
        values = sigmoid(values)
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


def _not_assessed(manifest: Manifest, cardiac_state: str) -> list[str]:
    """Findings the model has but may not publish, heart size when unvalidated, and stated limits."""
    missing: list[str] = []
    spec = manifest.output(Role.findings)
    if spec is not None:
        missing += [
            label for label in spec.labels if label != spec.normal_label and not spec.is_published(label)
        ]
    if cardiac_state == "not assessed":
        missing.append("heart size")
    heat = manifest.output(Role.heatmap)
    if heat is not None and not heat.is_published("zones"):
        missing.append("localisation")
    return missing + [item for item in manifest.not_assessed if item not in missing]


def lung_heat(heat: np.ndarray, lungs: np.ndarray | None, threshold: float) -> np.ndarray:
    """The heatmap inside the lungs only, re-normalised there: evidence outside the lungs (heart,
    labels, tubes) cannot put a zone on one side."""
    if lungs is None:
        return heat
    inside = heat * (lungs >= threshold)
    peak = float(inside.max()) if inside.size else 0.0
    return inside / peak if peak > 0 else inside


def read_outputs(
    manifest: Manifest,
    outputs: dict[str, np.ndarray],
    geometry: Geometry,
    meta: ImageMeta,
    *,
    with_heatmap: bool,
    pixels: np.ndarray | None = None,
) -> Reading:
    """Interpret one image's outputs (batch axis already removed). Only published outputs survive.

    `with_heatmap`: also render the heatmap as the small PNG of the MQTT payload (`heat` is kept either way).

    `pixels` (the decoded image, float in [0, 1]): also make the thorax-cropped thumbnail."""
    view, view_refusal = _view(manifest, outputs)
    ood, ood_refusal = _ood(manifest, outputs)
    # A lateral flagged by the view head is the more specific reason; otherwise the OOD guard.
    refusal = view_refusal or ood_refusal
    if refusal is not None:
        return refused(refusal, meta, view=view, ood=ood)
    findings = _findings(manifest, outputs)
    abnormal_spec = manifest.output(Role.abnormal)
    abnormal = (
        _abnormal(manifest, outputs) if abnormal_spec is None or abnormal_spec.all_published() else None
    )
    lungs = _map(manifest, outputs, Role.lung_mask, geometry)
    cardiac, cardiac_state = _cardiac(manifest, outputs, geometry, lungs, meta)
    zones: list[Zone] = []
    heat = None
    heat_spec = manifest.output(Role.heatmap)
    if heat_spec is not None and heat_spec.is_published("zones"):
        heat = _map(manifest, outputs, Role.heatmap, geometry)
    if heat is not None:
        mask_spec = manifest.output(Role.lung_mask)
        lung_threshold = mask_spec.thresholds.get("lung", 0.5) if mask_spec else 0.5
        heat = lung_heat(heat, lungs, lung_threshold)
        zones = lung_zones(heat, lungs, lung_threshold, ZONE_MIN_INVOLVEMENT)
    validated = decisions.Validated(
        abnormal=abnormal,
        findings=findings,
        severity=_severity(manifest, outputs),
        risk=_risk(manifest, outputs),
        cardiac=cardiac,
        cardiac_state=cardiac_state,
        zones=zones,
        not_assessed=_not_assessed(manifest, cardiac_state),
        measures_require=manifest.triage.measures_require,
    )
    policy = manifest.triage
    urgent = decisions.UrgentPoints.of(policy)
    level = decisions.triage(validated, urgent)
    validated = decisions.for_level(validated, level)
    # Shown only by a reading that may show it: a normal reading publishes no localisation.
    shown = heat if level != "normal" else None
    heat_label = (manifest.heatmap_label or "abnormal") if shown is not None else None
    # MQTT's option decides only MQTT's rendering (the PNG); the DICOM outputs use `shown` itself.
    heatmap = heatmap_png(shown, heat_label) if shown is not None and heat_label and with_heatmap else None
    thumbnail, skipped = None, None
    if pixels is not None:
        mask_spec = manifest.output(Role.lung_mask)
        box = (
            thorax_box(lungs, mask_spec.thresholds.get("lung", 0.5) if mask_spec else 0.5)
            if lungs is not None
            else "the model has no lung mask"
        )
        if isinstance(box, str):
            skipped = box
        else:
            # The overlay exactly when the heatmap itself is published: same validation, same readings.
            overlay = heat if heatmap is not None else None
            thumbnail = render(pixels, box, overlay, heatmap.label if heatmap is not None else None)
    sentences = [
        s
        for s in (
            text.view_sentence(meta, view),
            *decisions.sentences(validated, level, urgent),
            text.disclaimer_sentence(),
        )
        if s is not None
    ]
    return Reading(
        status="ok",
        triage=level,
        view=view,
        ood=ood,
        abnormal=abnormal,
        findings=findings,
        severity=validated.severity,
        risk=validated.risk,
        zones=validated.zones,
        heatmap=heatmap,
        cardiac=cardiac,
        not_assessed=validated.not_assessed,
        sentences=sentences,
        thumbnail=thumbnail,
        thumbnail_skipped=skipped,
        heat=shown,
        heat_label=heat_label,
    )
