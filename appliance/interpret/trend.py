"""A patient's change since the prior image: the `trend` of a result and its sentence.

Pure: the daemon finds the prior (same pseudonymous patient, earlier acquisition) in the journal;
this module compares the two results and never reads anything itself.
"""

from __future__ import annotations

from appliance.interpret.quoting import SCORE_DECIMALS, SEVERITY_DECIMALS
from appliance.interpret.text import join, trend_sentence
from appliance.journal import to_timestamp
from appliance.result import Result, Trend

# One point of the 0-8 extent scale is the smallest change radiologists score; below it, "unchanged".
EXTENT_STEP = 1.0
RISK_STEP = 0.1


def _when(result: Result) -> float | None:
    return to_timestamp(result.image.acquired_at) or to_timestamp(result.created_at)


def compare(current: Result, prior: Result) -> Trend:
    now, then = _when(current), _when(prior)
    extent_now = current.severity.extent if current.severity else None
    extent_before = prior.severity.extent if prior.severity else None
    risk_now = current.risk.score if current.risk else None
    risk_before = prior.risk.score if prior.risk else None
    direction = None
    # The change between the published values, rounded as they are: 2.4 -> 3.4 is a step of 1.0, not
    # 0.9999999, and the sentence quotes exactly the two values the direction was taken on.
    if extent_now is not None and extent_before is not None:
        change = round(extent_now - extent_before, SEVERITY_DECIMALS)
        direction = "worse" if change >= EXTENT_STEP else "better" if change <= -EXTENT_STEP else "unchanged"
    elif risk_now is not None and risk_before is not None:
        change = round(risk_now - risk_before, SCORE_DECIMALS)
        direction = "worse" if change >= RISK_STEP else "better" if change <= -RISK_STEP else "unchanged"
    return Trend(
        prior_image_id=prior.image.image_id,
        prior_acquired_at=prior.image.acquired_at or prior.created_at,
        interval_hours=round((now - then) / 3600.0, 2) if now is not None and then is not None else None,
        extent_before=extent_before,
        extent_now=extent_now,
        opacity_before=prior.severity.opacity if prior.severity else None,
        opacity_now=current.severity.opacity if current.severity else None,
        risk_before=risk_before,
        risk_now=risk_now,
        direction=direction,
    )


def with_trend(current: Result, prior: Result, urgent_extent: float | None = None) -> Result:
    """The result with its trend and, before the disclaimer, the sentence that reports it."""
    trend = compare(current, prior)
    sentences = list(current.sentences)
    extent_max = current.severity.extent_max if current.severity else None
    sentence = trend_sentence(trend, EXTENT_STEP, extent_max, urgent_extent)
    if sentence is not None:
        at = next((i for i, s in enumerate(sentences) if s.source == "disclaimer"), len(sentences))
        sentences.insert(at, sentence)
    return current.model_copy(update={"trend": trend, "sentences": sentences, "text": join(sentences)})
