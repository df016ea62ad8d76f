from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.interpret.decisions import UrgentPoints
from appliance.interpret.sequence_risk import features, image_risk, sequence_risk, with_sequence_risk
from appliance.manifest import SequenceRisk, load_manifest
from appliance.result import Finding, Result, Risk, Sentence, Severity
from testsupport.results import make_result

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
MODEL = Path(__file__).resolve().parents[2] / "engines" / "cxr-lite0"

# Only the change in risk counts: a rise since the prior must raise the sequence risk.
CHANGE_ONLY = SequenceRisk(
    enabled=True,
    features=["risk_logit", "risk_logit_change", "extent_change", "log_days"],
    mean=[0.0, 0.0, 0.0, 0.0],
    scale=[1.0, 1.0, 1.0, 1.0],
    coefficients=[1.0, 1.0, 0.0, 0.0],
    intercept=0.0,
    threshold=0.5,
)


def reading(n: int, risk: float, extent: float, when: datetime) -> Result:
    sentences = [
        Sentence(text="Frontal view.", source="view.frontal"),
        Sentence(text=f"Low deterioration risk ({risk:.2f}).", source="risk"),
        Sentence(text="Not for diagnostic use.", source="disclaimer"),
    ]
    return make_result(n, acquired_at=when).model_copy(
        update={
            "risk": Risk(score=risk, threshold=0.7, positive=risk >= 0.7),
            "severity": Severity(extent=extent, opacity=2.0),
            "sentences": sentences,
            "text": " ".join(s.text for s in sentences),
        }
    )


def test_features_from_two_results() -> None:
    prior = reading(1, 0.2, 2.0, T0)
    current = reading(2, 0.5, 5.0, T0 + timedelta(days=3))
    x = features(current, prior, ["risk_logit", "risk_logit_change", "extent", "extent_change", "log_days"])
    assert x is not None
    assert x[0] == pytest.approx(0.0)
    assert x[1] == pytest.approx(0.0 - math.log(0.2 / 0.8))
    assert list(x[2:4]) == [5.0, 3.0]
    assert x[4] == pytest.approx(math.log1p(3.0))


def test_rising_risk_scores_higher_than_falling_and_is_labelled_sequence() -> None:
    current = reading(3, 0.5, 4.0, T0 + timedelta(days=2))
    rising = sequence_risk(current, reading(1, 0.2, 4.0, T0), CHANGE_ONLY)
    falling = sequence_risk(current, reading(2, 0.8, 4.0, T0), CHANGE_ONLY)
    assert rising is not None and falling is not None
    assert rising.score > 0.5 > falling.score
    assert rising.method == falling.method == "sequence"
    assert rising.single_image_score == 0.5
    assert rising.positive is True and falling.positive is False


def test_result_gets_the_sequence_sentence_and_keeps_the_rest() -> None:
    prior = reading(1, 0.2, 3.0, T0)
    current = reading(2, 0.5, 3.0, T0 + timedelta(days=1))
    result = with_sequence_risk(current, prior, CHANGE_ONLY)
    assert result.risk is not None and result.risk.method == "sequence"
    assert [s.source for s in result.sentences] == ["view.frontal", "risk", "disclaimer"]
    assert "using earlier images" in result.sentences[1].text
    assert result.text == " ".join(s.text for s in result.sentences)
    assert current.risk is not None and current.risk.method == "single-image"  # input untouched


def test_disabled_missing_or_unread_leaves_the_result_alone() -> None:
    prior = reading(1, 0.2, 3.0, T0)
    current = reading(2, 0.5, 3.0, T0 + timedelta(days=1))
    assert with_sequence_risk(current, prior, None) is current
    disabled = CHANGE_ONLY.model_copy(update={"enabled": False})
    assert with_sequence_risk(current, prior, disabled) is current
    no_risk = prior.model_copy(update={"risk": None})
    assert with_sequence_risk(current, no_risk, CHANGE_ONLY) is current
    refused = prior.model_copy(update={"status": "refused"})
    assert with_sequence_risk(current, refused, CHANGE_ONLY) is current


def test_a_prior_that_had_a_sequence_risk_contributes_its_own_image_risk() -> None:
    first = reading(1, 0.2, 3.0, T0)
    second = with_sequence_risk(reading(2, 0.6, 3.0, T0 + timedelta(days=1)), first, CHANGE_ONLY)
    assert second.risk is not None and second.risk.score != 0.6
    assert image_risk(second) == 0.6
    third = reading(3, 0.6, 3.0, T0 + timedelta(days=2))
    x = features(third, second, ["risk_logit_change"])
    assert x is not None and x[0] == pytest.approx(0.0)


def test_manifest_coefficients_reproduce_the_training_side_numbers_on_real_images() -> None:
    """The appliance recomputes, from the manifest and fresh reads of real images, the probability the
    training tool computed for the same pairs."""
    from tools.training import dataset as data
    from tools.training.sequence_risk_pairs import Image, read_all

    manifest = load_manifest(MODEL)
    report_path = MODEL / "sequence_risk_report.json"
    if manifest.sequence_risk is None or not report_path.is_file():
        pytest.skip("no sequence risk model in engines/cxr-lite0 (run tools/training/train_sequence_risk.py)")
    checks = json.loads(report_path.read_text())["parity_checks"]
    assert checks, "the report lists no parity pairs"
    folder = data.data_dir()
    images = [
        Image(check[key], "p", check[f"{key}_offset_days"], 1, "validation")
        for check in checks
        for key in ("current", "prior")
    ]
    results = read_all(manifest, folder, images, threads=2)
    for check in checks:
        risk = sequence_risk(results[check["current"]], results[check["prior"]], manifest.sequence_risk)
        assert risk is not None
        assert risk.score == pytest.approx(check["probability"], abs=1e-4)


def test_the_triage_follows_the_sequence_risk_the_ward_sees() -> None:
    """T1: a published risk at or above the urgent risk is urgent. The sequence risk replaces the image's
    own, so the triage is decided again on it (it was left as the single-image risk had made it)."""
    named = {"findings": [Finding(label="COVID-19", score=0.9, threshold=0.5, positive=True)]}
    prior = reading(1, 0.2, 3.0, T0)
    current = reading(2, 0.5, 3.0, T0 + timedelta(days=1)).model_copy(update={"triage": "abnormal", **named})
    rising = with_sequence_risk(current, prior, CHANGE_ONLY, UrgentPoints(risk=0.6))
    assert rising.risk is not None and rising.risk.score >= 0.6 and rising.triage == "urgent"
    assert rising.sentences[1].text.startswith("High deterioration risk using earlier images (")
    falling = with_sequence_risk(
        reading(3, 0.65, 3.0, T0 + timedelta(days=1)).model_copy(update={"triage": "urgent", **named}),
        reading(4, 0.9, 3.0, T0),
        CHANGE_ONLY,
        UrgentPoints(risk=0.6),
    )
    assert falling.risk is not None and falling.risk.score < 0.6 and falling.triage == "abnormal"
