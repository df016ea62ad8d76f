"""Deterioration risk from a patient's current and prior image (method "sequence").

Pure and numpy-only: the daemon finds the prior in the journal; the model is a handful of logistic
coefficients in the manifest (`sequence_risk`), fitted by tools/training/train_sequence_risk.py with this very
feature code, so training and the appliance cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import numpy as np

from appliance.interpret.activation import sigmoid
from appliance.interpret.decisions import NO_URGENT_POINTS, UrgentPoints, risk_sentence, triage, validated_of
from appliance.interpret.quoting import decide
from appliance.interpret.text import join
from appliance.journal import to_timestamp
from appliance.manifest import SequenceFeature, SequenceRisk
from appliance.result import Result, Risk, Sentence

# Scores are published to 4 decimals: keep logits finite at 0 and 1.
SCORE_EPS = 1e-4
# Intervals beyond a year add nothing the training data could teach (its longest is months).
MAX_DAYS = 365.0


def image_risk(result: Result) -> float | None:
    """The image's own (single-image) risk, also when the stored score is already a sequence risk."""
    if result.risk is None:
        return None
    if result.risk.method == "sequence" and result.risk.single_image_score is not None:
        return result.risk.single_image_score
    return result.risk.score


def _logit(p: float) -> float:
    p = min(max(p, SCORE_EPS), 1.0 - SCORE_EPS)
    return math.log(p / (1.0 - p))


def _days(current: Result, prior: Result) -> float | None:
    now = to_timestamp(current.image.acquired_at) or to_timestamp(current.created_at)
    then = to_timestamp(prior.image.acquired_at) or to_timestamp(prior.created_at)
    if now is None or then is None:
        return None
    return min(max((now - then) / 86400.0, 0.0), MAX_DAYS)


def _extent(result: Result) -> float | None:
    return result.severity.extent if result.severity is not None else None


def _need(value: float | None) -> float:
    if value is None:
        raise _Missing
    return value


class _Missing(Exception):
    """A feature's input is absent from one of the results."""


FEATURES: dict[str, Callable[[Result, Result], float]] = {
    "risk_logit": lambda c, p: _logit(_need(image_risk(c))),
    "risk_logit_change": lambda c, p: _logit(_need(image_risk(c))) - _logit(_need(image_risk(p))),
    "extent": lambda c, p: _need(_extent(c)),
    "extent_change": lambda c, p: _need(_extent(c)) - _need(_extent(p)),
    "log_days": lambda c, p: math.log1p(_need(_days(c, p))),
}
assert set(FEATURES) == set(get_args(SequenceFeature)), "every manifest feature needs code here"


def features(current: Result, prior: Result, names: list[SequenceFeature]) -> np.ndarray | None:
    """The feature vector for one (current, prior) pair, or None when an input is missing."""
    try:
        return np.array([FEATURES[name](current, prior) for name in names], dtype=np.float64)
    except _Missing:
        return None


def probability(x: np.ndarray, model: SequenceRisk) -> np.ndarray:
    """Sigmoid of the standardised linear score; x is (n_features,) or (n, n_features)."""
    z = (x - np.asarray(model.mean)) / np.asarray(model.scale)
    linear = z @ np.asarray(model.coefficients) + model.intercept
    return sigmoid(np.asarray(linear))


def sequence_risk(current: Result, prior: Result, model: SequenceRisk) -> Risk | None:
    """The sequence risk for `current` given its most recent `prior`; None when it cannot be computed
    (either result lacks a risk or severity, or `current` was not read)."""
    if current.status != "ok" or prior.status != "ok":
        return None
    x = features(current, prior, model.features)
    own = image_risk(current)
    if x is None or own is None:
        return None
    score, threshold, positive = decide(float(probability(x, model)), model.threshold)
    return Risk(
        score=score,
        threshold=threshold,
        positive=positive,
        method="sequence",
        single_image_score=own,
    )


def with_sequence_risk(
    current: Result, prior: Result, model: SequenceRisk | None, urgent: UrgentPoints = NO_URGENT_POINTS
) -> Result:
    """`current` with its risk (and risk sentence) replaced by the sequence risk when the manifest
    enables it and it can be computed; otherwise `current` unchanged. The triage follows the risk the
    ward sees (T1: a published risk at or above the urgent risk is urgent, and only then)."""
    if model is None or not model.enabled:
        return current
    risk = sequence_risk(current, prior, model)
    if risk is None:
        return current
    sentence = risk_sentence(risk, urgent.risk)
    sentences: list[Sentence] = [sentence if s.source == "risk" else s for s in current.sentences]
    level = current.triage
    if level in ("abnormal", "urgent"):
        # Only urgent <-> abnormal can follow from the risk (T1); the sentences are those of either.
        again = triage(validated_of(current.model_copy(update={"risk": risk})), urgent)
        level = "urgent" if again == "urgent" else "abnormal"
    return current.model_copy(
        update={"risk": risk, "sentences": sentences, "text": join(sentences), "triage": level}
    )
