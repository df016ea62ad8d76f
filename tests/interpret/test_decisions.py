"""The decision table never lets the text contradict the fields: generated score combinations, plus
proof that the audit itself catches each kind of contradiction (so the property cannot pass vacuously)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.interpret import decisions
from appliance.interpret.quoting import decide
from appliance.result import CardiacSize, Finding, Risk, Score, Sentence, Severity, Zone

LABELS = ["COVID-19", "Pneumonia", "Nodule", "Effusion"]
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def near(point: float) -> st.SearchStrategy[float]:
    """Scores at and around an operating point, where rounding for the text could cross it."""
    return st.floats(-0.006, 0.006).map(lambda d: min(1.0, max(0.0, point + d)))


def scored(draw: st.DrawFn) -> tuple[float, float | None, bool | None]:
    """A score and its point as the reading publishes them (quoting.decide), often close together."""
    threshold = draw(unit)
    return decide(draw(st.one_of(unit, near(threshold))), threshold)


@st.composite
def validated(draw: st.DrawFn) -> tuple[decisions.Validated, decisions.UrgentPoints]:
    abnormal = None
    if draw(st.booleans()):
        score, threshold, positive = scored(draw)
        abnormal = Score(score=score, threshold=threshold, positive=positive)
    findings = []
    for label in draw(st.lists(st.sampled_from(LABELS), unique=True)):
        score, threshold, positive = scored(draw)
        findings.append(Finding(label=label, score=score, threshold=threshold, positive=bool(positive)))
    severity = None
    if draw(st.booleans()):
        severity = Severity(
            extent=draw(st.one_of(st.none(), st.floats(0, 8).map(lambda v: round(v, 2)))),
            opacity=draw(st.one_of(st.none(), st.floats(0, 6).map(lambda v: round(v, 2)))),
        )
    risk = None
    if draw(st.booleans()):
        score, threshold, positive = decide(draw(st.one_of(unit, near(0.5))), 0.5)
        risk = Risk(score=score, threshold=threshold, positive=positive)
    state = draw(st.sampled_from(["published", "unmeasurable", "not assessed"]))
    cardiac = None
    if state == "published":
        ratio = round(draw(st.floats(0.2, 0.9)), 2)
        cardiac = CardiacSize(
            ratio=ratio, threshold=0.5, enlarged=ratio >= 0.5, projection_caveat=draw(st.booleans())
        )
    zones = []
    for side in ("right", "left"):
        for level in ("upper", "middle", "lower"):
            involvement = round(draw(unit), 3)
            zones.append(Zone(side=side, level=level, involvement=involvement, positive=involvement >= 0.2))
    urgent = decisions.UrgentPoints(
        abnormal=draw(st.one_of(st.none(), unit.map(lambda v: round(v, 4)))),
        extent=draw(st.one_of(st.none(), st.floats(0, 8).map(lambda v: round(v, 2)))),
        risk=draw(st.one_of(st.none(), unit.map(lambda v: round(v, 4)))),
    )
    v = decisions.Validated(
        abnormal=abnormal,
        findings=findings,
        severity=severity,
        risk=risk,
        cardiac=cardiac,
        cardiac_state=state,
        zones=zones,
        not_assessed=draw(st.lists(st.sampled_from(["pneumothorax", "Edema", "heart size"]), unique=True)),
        measures_require=draw(st.sampled_from([[], ["COVID-19", "Pneumonia"], ["Nodule"]])),
    )
    return v, urgent


def read(
    v: decisions.Validated, urgent: decisions.UrgentPoints
) -> tuple[str, decisions.Validated, list[Sentence]]:
    level = decisions.triage(v, urgent)
    shown = decisions.for_level(v, level)
    return level, shown, decisions.sentences(shown, level, urgent)


def problems(level: str, v: decisions.Validated, sentences: list[Sentence]) -> list[str]:
    return decisions.audit(level, sentences, v.abnormal, v.findings, v.severity, v.risk, v.cardiac, v.zones)


@settings(max_examples=1500, deadline=None)
@given(validated())
def test_no_generated_combination_contradicts_itself(
    case: tuple[decisions.Validated, decisions.UrgentPoints],
) -> None:
    v, urgent = case
    level, shown, sentences = read(v, urgent)
    assert problems(level, shown, sentences) == []
    said = " ".join(s.text for s in sentences)
    if level == "normal":
        assert not any(f.positive for f in v.findings)
        assert shown.severity is None and shown.zones == []
    if "No abnormality detected" in said:
        assert level == "normal"
    for finding in v.findings:
        assert (f"Possible {finding.label} (" in said) == (finding.positive and level != "normal")
    if not v.measures_apply():  # S1: no severity or risk without a named finding they were validated on
        assert shown.severity is None and shown.risk is None
        assert not any(s.source in ("severity", "risk") for s in sentences)


def base_case() -> decisions.Validated:
    return decisions.Validated(
        abnormal=Score(score=0.8, threshold=0.5, positive=True),
        findings=[
            Finding(label="COVID-19", score=0.9, threshold=0.5, positive=True),
            Finding(label="Pneumonia", score=0.1, threshold=0.5, positive=False),
        ],
        severity=Severity(extent=5.0, opacity=3.0),
        risk=Risk(score=0.7, threshold=0.5, positive=True),
        cardiac=CardiacSize(ratio=0.55, threshold=0.5, enlarged=True),
        cardiac_state="published",
        zones=[Zone(side="right", level="lower", involvement=0.6, positive=True)],
    )


def test_the_base_case_reads_as_expected() -> None:
    level, shown, sentences = read(base_case(), decisions.UrgentPoints())
    assert level == "abnormal"
    assert [s.text for s in sentences] == [
        "Possible COVID-19 (0.90).",
        "Model attention highest in the right lower zone.",
        "Lung involvement: extent 5.0 of 8, opacity 3.0 of 6.",
        "Cardiothoracic ratio 0.55: enlarged cardiac silhouette (at or above 0.50).",
        "High deterioration risk (0.70).",
    ]
    assert problems(level, shown, sentences) == []


def test_an_enlarged_heart_alone_is_not_read_as_normal() -> None:
    v = base_case()
    v.abnormal = Score(score=0.1, threshold=0.5, positive=False)
    v.findings = []
    level, _, sentences = read(v, decisions.UrgentPoints())
    assert level == "abnormal"
    assert not any("No abnormality" in s.text for s in sentences)


def test_severity_and_risk_are_read_only_with_the_findings_they_were_validated_on() -> None:
    v = base_case()
    v.measures_require = ["Pneumonia"]  # COVID-19 is named, pneumonia is not
    level, shown, sentences = read(v, decisions.UrgentPoints(extent=4.0, risk=0.5))
    assert level == "abnormal"  # neither the extent nor the risk may make it urgent here
    assert shown.severity is None and shown.risk is None
    assert not any(s.source in ("severity", "risk") for s in sentences)
    v.measures_require = ["COVID-19", "Pneumonia"]
    assert decisions.triage(v, decisions.UrgentPoints(extent=4.0)) == "urgent"


def test_urgent_comes_from_the_published_outputs_only() -> None:
    v = base_case()
    assert decisions.triage(v, decisions.UrgentPoints(extent=4.0)) == "urgent"
    v.severity = Severity(extent=None, opacity=3.0)  # extent not published: it cannot make anything urgent
    assert decisions.triage(v, decisions.UrgentPoints(extent=4.0)) == "abnormal"


def test_the_audit_catches_each_kind_of_contradiction() -> None:
    v = base_case()
    level, shown, sentences = read(v, decisions.UrgentPoints())

    def with_sentence(text: str, source: str) -> list[str]:
        return problems(level, shown, [*sentences, Sentence(text=text, source=source)])

    assert with_sentence("Possible Pneumonia (0.10).", "findings.Pneumonia")  # below its point
    assert with_sentence("Possible Edema (0.70).", "findings.Edema")  # not in the payload
    assert with_sentence("No abnormality detected above the operating point (score 0.80).", "abnormal")
    assert problems(level, shown, [Sentence(text="Possible COVID-19 (0.15).", source="findings.COVID-19")])
    assert with_sentence("Lung involvement: extent 2.0 of 8.", "severity")
    assert with_sentence("Cardiothoracic ratio 0.55: heart size not enlarged (below 0.50).", "cardiac")
    assert with_sentence("Low deterioration risk (0.70).", "risk")
    assert with_sentence("Model attention highest in the left upper zone.", "zones")
    # A positive finding left out of an abnormal reading is a contradiction too.
    assert problems(level, shown, [s for s in sentences if not s.text.startswith("Possible")])
