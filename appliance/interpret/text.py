"""The brief description. Every sentence is built from one model output (or tag) and names it.

No free-text model: a sentence exists only because a value crossed an operating point, so a reader
(or an auditor) can trace each one back through `Result.sentences[i].source`.
"""

from __future__ import annotations

from appliance import NOT_FOR_DIAGNOSTIC_USE
from appliance.image import ImageMeta
from appliance.result import Finding, Sentence, Trend

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
