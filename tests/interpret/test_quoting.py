"""Numbers decided on as published and quoted on their side of every point (found by a review run:
"No abnormality detected above the operating point (score 0.72)" beside a point of 0.7157)."""

from __future__ import annotations

import pytest

from appliance.interpret import decisions
from appliance.interpret.quoting import agrees, decide, quote
from appliance.result import Finding, Risk, Score, Severity


def test_the_decision_is_taken_on_the_published_values() -> None:
    # 0.71566 publishes as 0.7157, its point: "at or above" must hold for the numbers the ward sees.
    assert decide(0.71566, 0.7157) == (0.7157, 0.7157, True)
    assert decide(0.71564, 0.7157) == (0.7156, 0.7157, False)
    assert decide(1.81964, 1.8196, strict=True) == (1.8196, 1.8196, False)  # the OOD rule is "above"
    assert decide(0.4, None) == (0.4, None, None)


@pytest.mark.parametrize(
    ("value", "points", "quoted"),
    [
        (0.34, (0.5,), "0.34"),
        (0.7153, (0.7157,), "0.715"),
        (0.7157, (0.7157,), "0.72"),  # equal stays equal
        (0.7156, (0.7157,), "0.7156"),
        (0.5972, (0.5, 0.5974), "0.5972"),  # below the urgent risk point, high beside 0.5
        (0.91, (0.5, None), "0.91"),
    ],
)
def test_a_quote_keeps_its_side_of_every_point(value: float, points: tuple[float, ...], quoted: str) -> None:
    assert quote(value, *points) == quoted
    assert agrees(quoted, value, *points)


def test_the_audit_refuses_a_quote_that_crosses_its_point() -> None:
    assert not agrees("0.72", 0.7153, 0.7157)
    assert not agrees("0.7", 0.7153)  # fewer than 2 decimals for a score
    assert not agrees("0.716", 0.7153)  # not the value


BELOW = Score(score=0.7153, threshold=0.7157, positive=False)
NAMED = Finding(label="COVID-19", score=0.9, threshold=0.5, positive=True)


def outputs(
    findings: list[Finding], severity: Severity | None = None, risk: Risk | None = None
) -> decisions.Validated:
    return decisions.Validated(
        abnormal=BELOW,
        findings=findings,
        severity=severity,
        risk=risk,
        cardiac=None,
        cardiac_state="not assessed",
        zones=[],
    )


def test_sentences_at_the_boundaries_read_as_the_fields() -> None:
    v = outputs([])
    level = decisions.triage(v, decisions.UrgentPoints())
    said = decisions.sentences(v, level)
    assert level == "normal"
    assert said[0].text == "No abnormality detected above the operating point (score 0.715)."
    urgent = decisions.UrgentPoints(extent=6.0, risk=0.5974)
    v = outputs([NAMED], Severity(extent=5.96, opacity=0.0), Risk(score=0.5972, threshold=0.5, positive=True))
    level = decisions.triage(v, urgent)
    texts = [s.text for s in decisions.sentences(v, level, urgent)]
    assert level == "abnormal"
    assert "Lung involvement: extent 5.96 of 8, opacity 0.0 of 6." in texts  # not "6.0", which is urgent
    assert "High deterioration risk (0.5972)." in texts  # not "0.60", above the urgent 0.5974


@pytest.mark.parametrize(
    ("extent", "said"),
    [
        (0.04, "Lung involvement: extent 0.04 of 8, opacity 0.0 of 6."),  # 0.04 is not 0.0
        (0.0, "No lung involvement measured: extent 0.0 of 8, opacity 0.0 of 6."),
    ],
)
def test_no_lung_involvement_only_when_every_measure_is_zero(extent: float, said: str) -> None:
    v = outputs([NAMED], Severity(extent=extent, opacity=0.0))
    sentences = decisions.sentences(v, "abnormal")
    assert said in [s.text for s in sentences]
    assert decisions.audit("abnormal", sentences, BELOW, [NAMED], v.severity, None, None, []) == []
