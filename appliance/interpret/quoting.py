"""Numbers as a reading publishes and quotes them, so that no sentence contradicts the fields beside it.

Scores and their operating points are published to 4 decimals, and every decision (positive, triage) is
taken on the published values: the payload's score, threshold and `positive` always agree. The text (and
the ward display, appliance/display/app.js, which applies the same rule) quotes a number with as few
decimals as keep its relation to the points it is compared with: 0.34 beside an operating point of 0.50
is "0.34", but 0.7153 beside 0.7157 is "0.715" (at two decimals both read 0.72, and "No abnormality
detected above the operating point (score 0.72)" beside a point of 0.7157 would contradict itself), and
a score equal to its point is quoted equal to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SCORE_DECIMALS = 4
# Severity scores (0-8 extent, 0-6 opacity) are published and decided on to two decimals, and quoted to
# one where that keeps them on their side of the urgent extent (5.96 is "5.96", not "6.0", below 6).
SEVERITY_DECIMALS = 2


def published(value: float) -> float:
    """A score or operating point as the payload carries it."""
    return round(value, SCORE_DECIMALS)


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def _shown(value: float, decimals: int) -> float:
    return float(f"{value:.{decimals}f}")


def decimals_for(
    value: float, points: Iterable[float | None], least: int = 2, most: int = SCORE_DECIMALS
) -> int:
    """The fewest decimals (at least `least`) at which `value` compares with each of `points`, each shown
    with as many decimals, as it does unrounded; `most` when none does (never for published values)."""
    compared = [p for p in points if p is not None]
    for decimals in range(least, most + 1):
        shown = _shown(value, decimals)
        if all(_sign(shown - _shown(p, decimals)) == _sign(value - p) for p in compared):
            return decimals
    return most


def quote(value: float, *points: float | None, least: int = 2, most: int = SCORE_DECIMALS) -> str:
    """`value` for a sentence, beside the operating points it was decided against."""
    return f"{value:.{decimals_for(value, points, least, most)}f}"


def quote_severity(value: float, *points: float | None) -> str:
    return quote(value, *points, least=1, most=SEVERITY_DECIMALS)


def agrees(quoted: str, value: float, *points: float | None, least: int = 2) -> bool:
    """Whether a number quoted in a sentence is `value`, rounded, and compares with each of `points` as
    `value` does (the audit's test: decisions.audit)."""
    if re.fullmatch(r"\d+(?:\.\d+)?", quoted) is None:
        return False
    decimals = len(quoted.partition(".")[2])
    if decimals < least or float(quoted) != _shown(value, decimals):
        return False
    return all(
        _sign(float(quoted) - _shown(p, decimals)) == _sign(value - p) for p in points if p is not None
    )


def decide(
    score: float, threshold: float | None, *, strict: bool = False
) -> tuple[float, float | None, bool | None]:
    """Score and operating point as published, and the decision taken on exactly those: positive at or
    above the point (`strict`: above it). None when there is no point."""
    shown = published(score)
    if threshold is None:
        return shown, None, None
    point = published(threshold)
    return shown, point, (shown > point if strict else shown >= point)
