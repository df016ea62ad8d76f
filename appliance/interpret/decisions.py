"""The decision table: from validated (published) outputs to a triage level and the words of the reading.

This module is the only place that decides what a reading says; docs/reading.md is the same table in
prose. Every sentence names the one output it comes from (`Sentence.source`), quotes the value the
payload carries beside it, and exists only because that value crossed its operating point, so the
text cannot contradict the fields. Decisions are taken on the published (rounded) values, and a quoted
number keeps its side of every point it was decided against (appliance/interpret/quoting.py). `audit` checks exactly that and is run over every validation image
and over generated score combinations (tests/interpret/test_decisions.py, tools/training/evaluate.py).

| rule | when | says |
|------|------|------|
| S1          | no finding of the manifest's `measures_require` named | severity and risk are not read (validated on those patients only) |
| T1 urgent   | abnormal >= urgent point, or published extent >= urgent extent, or published risk >= urgent risk | triage "urgent" |
| T2 abnormal | abnormal >= its point, or a published finding >= its point, or an enlarged heart (C1) | triage "abnormal" |
| T3 normal   | none of the above | triage "normal" |
| N1          | T3 only | "No abnormality detected above the operating point (score s)." |
| F1          | T1/T2, each published finding >= its point, highest score first | "Possible <finding> (s)." |
| F2          | T1/T2 with no finding named and abnormal >= its point | "Abnormal appearance (score s); no named finding above its operating point." |
| Z1          | T1/T2 and at least one lung zone involved | "Model attention highest in <zones>." |
| M1          | T1/T2, published measures only | "Lung involvement: extent e of 8, opacity o of 6." ("No lung involvement measured: ..." when each is 0.0) |
| C1          | ratio published and measurable | "Cardiothoracic ratio r: enlarged cardiac silhouette (>= t)." or "...: heart size not enlarged (< t)." (+ AP caveat) |
| C2          | ratio published but not measurable (masks missing or implausible) | "Heart size could not be measured." |
| R1          | risk published | "High/Low deterioration risk (s)." |
| X1          | always | "Not assessed: <unvalidated findings, heart size when the ratio is unvalidated, the model's stated limits>." |

"No finding" is never a model output of its own: it is N1, said only when nothing above is positive.
Severity and zones describe an abnormal image: on a normal reading they are not published at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from appliance.interpret.quoting import agrees, decimals_for, quote, quote_severity
from appliance.interpret.zones import describe_zones
from appliance.manifest import TriagePolicy
from appliance.result import (
    CardiacSize,
    Finding,
    Result,
    Risk,
    Score,
    Sentence,
    Severity,
    TriageLevel,
    Zone,
)


@dataclass(frozen=True)
class UrgentPoints:
    abnormal: float | None = None
    extent: float | None = None
    risk: float | None = None

    @classmethod
    def of(cls, policy: TriagePolicy) -> UrgentPoints:
        return cls(policy.urgent_threshold, policy.urgent_extent, policy.urgent_risk)


NO_URGENT_POINTS = UrgentPoints()


@dataclass
class Validated:
    """The published outputs of one image (unpublished ones are already absent)."""

    abnormal: Score | None
    findings: list[Finding]
    severity: Severity | None
    risk: Risk | None
    cardiac: CardiacSize | None
    cardiac_state: str  # "published", "unmeasurable" or "not assessed"
    zones: list[Zone]
    not_assessed: list[str] = field(default_factory=list)
    measures_require: list[str] = field(default_factory=list)

    def measures_apply(self) -> bool:
        """Severity and risk were validated on patients with these findings only (S1)."""
        return not self.measures_require or any(
            f.positive and f.label in self.measures_require for f in self.findings
        )


def triage(v: Validated, urgent: UrgentPoints) -> TriageLevel:
    v = applicable(v)
    if (
        (v.abnormal is not None and urgent.abnormal is not None and v.abnormal.score >= urgent.abnormal)
        or (
            v.severity is not None
            and v.severity.extent is not None
            and urgent.extent is not None
            and v.severity.extent >= urgent.extent
        )
        or (v.risk is not None and urgent.risk is not None and v.risk.score >= urgent.risk)
    ):
        return "urgent"
    if (
        (v.abnormal is not None and v.abnormal.positive)
        or any(f.positive for f in v.findings)
        or (v.cardiac is not None and v.cardiac.enlarged)
    ):
        return "abnormal"
    return "normal"


def _measures(severity: Severity, urgent_extent: float | None) -> Sentence | None:
    """M1, each measure on its side of the urgent extent; "no lung involvement" when every one is 0."""
    parts, values = [], []
    for name, value, top, point in (
        ("extent", severity.extent, severity.extent_max, urgent_extent),
        ("opacity", severity.opacity, severity.opacity_max, None),
    ):
        if value is not None:
            # 0 is a point too: 0.04 is "0.04", not "0.0", beside "lung involvement".
            parts.append(f"{name} {quote_severity(value, point, 0.0)} of {top:.0f}")
            values.append(value)
    if not parts:
        return None
    said = "Lung involvement: " if any(values) else "No lung involvement measured: "
    return Sentence(text=f"{said}{', '.join(parts)}.", source="severity")


def cardiac_sentence(v: Validated) -> Sentence | None:
    """C1/C2; an unvalidated ratio is named once, in the X1 'Not assessed' sentence."""
    if v.cardiac is None:
        if v.cardiac_state == "unmeasurable":
            return Sentence(text="Heart size could not be measured.", source="cardiac")
        return None
    c = v.cardiac
    places = decimals_for(c.ratio, [c.threshold])
    verdict = (
        f"enlarged cardiac silhouette (at or above {c.threshold:.{places}f})"
        if c.enlarged
        else f"heart size not enlarged (below {c.threshold:.{places}f})"
    )
    caveat = "; AP projection overstates heart size" if c.projection_caveat else ""
    return Sentence(text=f"Cardiothoracic ratio {c.ratio:.{places}f}: {verdict}{caveat}.", source="cardiac")


def risk_sentence(risk: Risk, urgent: float | None = None) -> Sentence:
    """R1; `urgent`: the risk at which triage says urgent (the quote keeps its side of it too)."""
    word = "High" if risk.positive else "Low"
    basis = " using earlier images" if risk.method == "sequence" else ""
    return Sentence(
        text=f"{word} deterioration risk{basis} ({quote(risk.score, risk.threshold, urgent)}).", source="risk"
    )


def sentences(v: Validated, level: TriageLevel, urgent: UrgentPoints = NO_URGENT_POINTS) -> list[Sentence]:
    """The reading's sentences between the view sentence and the trend/disclaimer. Each number is quoted
    so that it compares with its operating points (and the urgent points) as the field does (quoting.py)."""
    out: list[Sentence] = []
    abnormal = (
        quote(v.abnormal.score, v.abnormal.threshold, urgent.abnormal) if v.abnormal is not None else ""
    )
    if level == "normal":
        if v.abnormal is not None:
            out.append(
                Sentence(
                    text=f"No abnormality detected above the operating point (score {abnormal}).",
                    source="abnormal",
                )
            )
    else:
        named = sorted((f for f in v.findings if f.positive), key=lambda f: -f.score)
        for finding in named:
            out.append(
                Sentence(
                    text=f"Possible {finding.label} ({quote(finding.score, finding.threshold)}).",
                    source=f"findings.{finding.label}",
                )
            )
        if not named and v.abnormal is not None and v.abnormal.positive:
            out.append(
                Sentence(
                    text=f"Abnormal appearance (score {abnormal}); "
                    "no named finding above its operating point.",
                    source="abnormal",
                )
            )
        zone_text = describe_zones(v.zones)
        if zone_text:
            out.append(Sentence(text=f"Model attention highest in {zone_text}.", source="zones"))
        measures = _measures(v.severity, urgent.extent) if v.severity is not None else None
        if measures is not None:
            out.append(measures)
    if (cardiac := cardiac_sentence(v)) is not None:
        out.append(cardiac)
    if v.risk is not None:
        out.append(risk_sentence(v.risk, urgent.risk))
    if v.not_assessed:
        out.append(
            Sentence(text=f"Not assessed: {', '.join(v.not_assessed)}.", source="manifest.not_assessed")
        )
    return out


def applicable(v: Validated) -> Validated:
    """S1: without a named finding from `measures_require`, severity and risk are not read at all."""
    if v.measures_apply():
        return v
    return replace(v, severity=None, risk=None)


def for_level(v: Validated, level: TriageLevel) -> Validated:
    """Severity and zones describe an abnormal image: a normal reading publishes neither."""
    v = applicable(v)
    if level != "normal":
        return v
    return replace(v, severity=None, zones=[])


# --- audit: the text against the fields ------------------------------------------------------------

_NUMBER = r"(\d+(?:\.\d+)?)"


def audit(
    triage_level: str | None,
    sentences: Sequence[Sentence],
    abnormal: Score | None,
    findings: Sequence[Finding],
    severity: Severity | None,
    risk: Risk | None,
    cardiac: CardiacSize | None,
    zones: Sequence[Zone],
) -> list[str]:
    """Every way the text could contradict the fields beside it; empty when it does not."""
    problems: list[str] = []
    by_label = {f.label: f for f in findings}
    said = " ".join(s.text for s in sentences)
    normal_said = "No abnormality detected" in said
    if normal_said and triage_level != "normal":
        problems.append(f"'no abnormality' said with triage {triage_level}")
    if triage_level == "normal" and any(f.positive for f in findings):
        problems.append("triage normal with a positive finding")
    if normal_said and abnormal is not None and abnormal.positive:
        problems.append("'no abnormality' said with a positive abnormal score")
    for sentence in sentences:
        text = sentence.text
        if (m := re.fullmatch(rf"Possible (.+) \({_NUMBER}\)\.", text)) is not None:
            finding = by_label.get(m.group(1))
            if finding is None:
                problems.append(f"names {m.group(1)!r}, which the payload does not carry")
            elif not finding.positive:
                problems.append(f"names {finding.label} below its operating point")
            elif not agrees(m.group(2), finding.score, finding.threshold):
                problems.append(f"quotes {finding.label} as {m.group(2)}, field {finding.score}")
            if normal_said:
                problems.append(f"names {m.group(1)} and says no abnormality")
        m = re.search(rf"score {_NUMBER}\)", text)
        if (
            m is not None
            and sentence.source == "abnormal"
            and (abnormal is None or not agrees(m.group(1), abnormal.score, abnormal.threshold))
        ):
            problems.append(f"quotes the abnormal score as {m.group(1)}")
        if sentence.source == "severity":
            for name, value in (
                ("extent", severity.extent if severity else None),
                ("opacity", severity.opacity if severity else None),
            ):
                if (m := re.search(rf"{name} {_NUMBER} of", text)) is not None and (
                    value is None or not agrees(m.group(1), value, 0.0, least=1)
                ):
                    problems.append(f"quotes {name} {m.group(1)}, field {value}")
        if sentence.source == "severity" and text.startswith("Lung involvement") != any(
            (severity.extent, severity.opacity) if severity else ()
        ):
            problems.append("says lung involvement where every measure is 0, or none where one is not")
        if sentence.source == "cardiac" and (m := re.search(rf"ratio {_NUMBER}", text)) is not None:
            if cardiac is None or not agrees(m.group(1), cardiac.ratio, cardiac.threshold):
                problems.append("quotes a cardiothoracic ratio the payload does not carry")
            elif ("enlarged cardiac silhouette" in text) != cardiac.enlarged:
                problems.append("cardiac wording disagrees with `enlarged`")
        if sentence.source == "risk":
            if risk is None:
                problems.append("risk sentence without a published risk")
            elif text.startswith("High") != bool(risk.positive) or not (
                (m := re.search(rf"\({_NUMBER}\)\.$", text))
                and agrees(m.group(1), risk.score, risk.threshold)
            ):
                problems.append("risk wording disagrees with the risk field")
        if sentence.source == "zones" and (describe_zones(list(zones)) or "\0") not in text:
            problems.append("zone sentence disagrees with the zones")
    named = {m.group(1) for s in sentences if (m := re.fullmatch(r"Possible (.+) \(.*", s.text))}
    if triage_level in ("abnormal", "urgent"):
        missing = [f.label for f in findings if f.positive and f.label not in named]
        if missing:
            problems.append(f"positive findings not named: {missing}")
    return problems


def validated_of(result: Result) -> Validated:
    """The published outputs of a result, as the decisions read them (a result carries only those)."""
    return Validated(
        abnormal=result.abnormal,
        findings=list(result.findings),
        severity=result.severity,
        risk=result.risk,
        cardiac=result.cardiac,
        cardiac_state="published" if result.cardiac is not None else "not assessed",
        zones=list(result.zones),
    )


def audit_result(result: Result) -> list[str]:
    """`audit` on a published result."""
    return audit(
        result.triage,
        result.sentences,
        result.abnormal,
        result.findings,
        result.severity,
        result.risk,
        result.cardiac,
        result.zones,
    )
