"""Patient history for ward displays: a read-only query answered from the cart's journal over MQTT.

A display that starts at 3 a.m. asks each cart for the earlier results of the patients it shows
(`history/request`, HistoryRequest) and the cart answers on `history/response` (History). Why over the
broker and not the display server: every cart holds its own journal and the page already talks to every
cart through the broker, with the display account's password and ACL; a display server runs beside one
cart (or not at all: any static web server may serve the page). See docs/display.md.

Read-only by construction: the request names a pseudonymous key and a count, the answer is a SELECT
(Journal.priors), nothing from a request is stored. The answer holds the pseudonymous key and values the
results already published, never the heatmap, an image or anything from the DICOM header.
"""

from __future__ import annotations

from appliance.config import DeviceConfig
from appliance.journal import Journal
from appliance.result import History, HistoryPoint, HistoryRequest, Result


def point(result: Result) -> HistoryPoint:
    severity = result.severity
    return HistoryPoint(
        message_id=result.message_id,
        image_id=result.image.image_id,
        location=result.location,
        acquired_at=result.image.acquired_at,
        created_at=result.created_at,
        triage=result.triage,
        extent=severity.extent if severity else None,
        extent_max=severity.extent_max if severity else 8.0,
        opacity=severity.opacity if severity else None,
        opacity_max=severity.opacity_max if severity else 6.0,
        risk=result.risk.score if result.risk else None,
    )


def answer(journal: Journal, request: HistoryRequest, device: DeviceConfig) -> History:
    """The patient's newest `limit` read results on this cart, oldest first."""
    results = journal.priors(request.patient_key, limit=request.limit)
    return History(
        request_id=request.request_id,
        site=device.site,
        device_id=device.device_id,
        patient_key=request.patient_key,
        points=[point(r) for r in results],
    )
