"""The brief description. Every sentence is built from one model output (or tag) and names it.

No free-text model: a sentence exists only because a value crossed an operating point, so a reader
(or an auditor) can trace each one back through `Result.sentences[i].source`.
"""

from __future__ import annotations

from appliance import NOT_FOR_DIAGNOSTIC_USE
from appliance.image import ImageMeta
from appliance.interpret.quoting import SEVERITY_DECIMALS, decimals_for
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


def trend_sentence(
    trend: Trend, step: float, extent_max: float | None, urgent_extent: float | None = None
) -> Sentence | None:
    """The change of extent, quoted as published (the severity sentence's decimals). `step`: the least
    change called worse or better; below it the sentence says so rather than "unchanged", since 2.5 -> 3.4
    is a change, only not one of a whole point."""
    if trend.direction is None or trend.extent_before is None or trend.extent_now is None:
        return None
    when = _interval(trend.interval_hours) if trend.interval_hours is not None else "the prior image"
    word = {
        "worse": f"Worse than {when}",
        "better": f"Better than {when}",
        "unchanged": f"No change of {step:g} point or more since {when}",
    }[trend.direction]
    of = f" of {extent_max:.0f}" if extent_max is not None else ""
    # One decimal, as the severity sentence, unless the two quoted values would differ by a whole step
    # where the published ones do not (2.44 -> 3.43 is "2.44 -> 3.43", not "2.4 -> 3.4", beside "no change").
    before, now = trend.extent_before, trend.extent_now
    change = abs(round(now - before, SEVERITY_DECIMALS))
    quoted = abs(round(float(f"{now:.1f}") - float(f"{before:.1f}"), 1))
    places = 1 if (quoted >= step) == (change >= step) else SEVERITY_DECIMALS
    # ... and each on its side of the urgent extent, as the severity sentence quotes it (5.96, not 6.0).
    for value in (before, now):
        places = max(places, decimals_for(value, [urgent_extent], least=1, most=SEVERITY_DECIMALS))
    return Sentence(
        text=f"{word}: extent {before:.{places}f} → {now:.{places}f}{of}.",
        source="trend",
    )


def disclaimer_sentence() -> Sentence:
    return Sentence(text=f"{NOT_FOR_DIAGNOSTIC_USE}.", source="disclaimer")


def join(sentences: list[Sentence]) -> str:
    return " ".join(s.text for s in sentences)
