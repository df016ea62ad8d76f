"""What a patient's earlier images add to a reading: the trend and (when the manifest enables it) the
sequence risk. The earlier results come from any `PriorStore` (the journal on a cart)."""

from __future__ import annotations

import logging
import sqlite3
from typing import Protocol

from appliance.interpret.decisions import NO_URGENT_POINTS, UrgentPoints
from appliance.interpret.sequence_risk import with_sequence_risk
from appliance.interpret.trend import with_trend
from appliance.manifest import SequenceRisk
from appliance.result import Result

log = logging.getLogger("appliance.interpret.priors")


class PriorStore(Protocol):
    def priors(self, patient_key: str, before_time: str, limit: int = ...) -> list[Result]:
        """Earlier results of this patient acquired before `before_time`, oldest first, at most `limit`."""
        ...


# Earlier results looked at for one of the same model: a cart's patient rarely has more in a stay.
PRIORS_SEEN = 10


def _model(result: Result) -> tuple[str, str]:
    return result.provenance.model, result.provenance.model_version


def with_priors(
    result: Result, store: PriorStore, sequence: SequenceRisk | None, urgent: UrgentPoints = NO_URGENT_POINTS
) -> Result:
    """The result with its trend against the patient's previous image; unchanged when there is none or
    the prior cannot be read (a trend is an extra: it never stops a reading)."""
    if result.status != "ok" or not result.patient_key:
        return result
    try:
        earlier = store.priors(
            result.patient_key, result.image.acquired_at or result.created_at, limit=PRIORS_SEEN
        )
        # Scores of another model (or version) are on another scale: compared with them, a new model
        # would report a change that is only the change of model.
        same = [p for p in earlier if _model(p) == _model(result)]
        if not same:
            return result
        # The manifest's sequence model (when enabled) replaces the single-image risk; the trend then
        # reports the risk the ward sees.
        result = with_sequence_risk(result, same[-1], sequence, urgent)
        return with_trend(result, same[-1], urgent.extent)
    except (sqlite3.Error, ValueError):  # e.g. a prior stored by an older payload version
        log.exception("%s: trend skipped (the prior could not be read)", result.image.image_id[:12])
        return result
