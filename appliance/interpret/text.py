"""The brief description. Every sentence is built from one model output (or tag) and names it.

No free-text model: a sentence exists only because a value crossed an operating point, so a reader
(or an auditor) can trace each one back through `Result.sentences[i].source`.
"""

from __future__ import annotations

from appliance import NOT_FOR_DIAGNOSTIC_USE
from appliance.image import ImageMeta
from appliance.interpret.zones import describe_zones
from appliance.result import Finding, Risk, Score, Sentence, Severity, Trend, Zone

FRONTAL_POSITIONS = {"PA", "AP"}


def view_sentence(meta: ImageMeta, view: Finding | None) -> Sentence | None:
    position = (meta.view_position or "").upper()
    if position in FRONTAL_POSITIONS:
        return Sentence(text=f"Frontal {position} view.", source="dicom.ViewPosition")
    if view is not None and view.label == "frontal":
        return Sentence(text=f"Frontal view ({view.score:.2f}).", source="view.frontal")
    return None


def refusal_sentence(reason: str, detail: str, source: str) -> Sentence:
    return Sentence(text=f"Not read: {reason} ({detail}).", source=source)


def findings_sentences(
    abnormal: Score | None,
    findings: list[Finding],
    normal_label: str | None,
    severity: Severity | None,
    zones: list[Zone],
) -> list[Sentence]:
    sentences: list[Sentence] = []
    is_abnormal = bool(abnormal and abnormal.positive)
    if abnormal is not None and not is_abnormal:
        sentences.append(
            Sentence(
                text=f"No abnormality above the operating point (score {abnormal.score:.2f}).",
                source="abnormal",
            )
        )
    zone_text = describe_zones(zones) if is_abnormal else None
    measures = (
        f"extent {severity.extent:.0f}/{severity.extent_max:.0f}, opacity {severity.opacity:.0f}/{severity.opacity_max:.0f}"
        if severity is not None
        else None
    )
    if zone_text and measures:
        sentences.append(
            Sentence(text=f"Opacities in {zone_text}, {measures}.", source="heatmap+lung_mask+severity")
        )
    elif zone_text:
        sentences.append(Sentence(text=f"Opacities in {zone_text}.", source="heatmap+lung_mask"))
    elif is_abnormal and measures:
        sentences.append(Sentence(text=f"Lung involvement {measures}.", source="severity"))
    positive = sorted((f for f in findings if f.positive and f.label != normal_label), key=lambda f: -f.score)
    if positive and (is_abnormal or abnormal is None):
        top = positive[0]
        sentences.append(
            Sentence(
                text=f"Most consistent with {top.label} ({top.score:.2f}).", source=f"findings.{top.label}"
            )
        )
        for other in positive[1:]:
            sentences.append(
                Sentence(
                    text=f"{other.label} also possible ({other.score:.2f}).", source=f"findings.{other.label}"
                )
            )
    return sentences


def risk_sentence(risk: Risk | None) -> Sentence | None:
    if risk is None:
        return None
    word = "High" if risk.positive else "Low"
    basis = " using earlier images" if risk.method == "sequence" else ""
    return Sentence(text=f"{word} deterioration risk{basis} ({risk.score:.2f}).", source="risk")


def _interval(hours: float) -> str:
    if hours < 36:
        return f"{hours:.0f} hours ago"
    return f"{hours / 24:.0f} days ago"


def trend_sentence(trend: Trend) -> Sentence | None:
    if trend.direction is None or trend.extent_before is None or trend.extent_now is None:
        return None
    when = _interval(trend.interval_hours) if trend.interval_hours is not None else "the prior image"
    word = {"worse": "Worse than", "better": "Better than", "unchanged": "Unchanged since"}[trend.direction]
    return Sentence(
        text=f"{word} {when}: extent {trend.extent_before:.0f} → {trend.extent_now:.0f} of 8.", source="trend"
    )


def disclaimer_sentence() -> Sentence:
    return Sentence(text=f"{NOT_FOR_DIAGNOSTIC_USE}.", source="disclaimer")


def join(sentences: list[Sentence]) -> str:
    return " ".join(s.text for s in sentences)
