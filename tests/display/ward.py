"""A realistic ward's worth of results for the display v2 tests: sentences and published values shaped
like the appliance's (appliance/interpret), including outputs left out because they are not validated."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from appliance.result import Result
from tests.display.results import make_result

DISCLAIMER = ("Not for diagnostic use.", "disclaimer")
NOT_ASSESSED = ["Atelectasis", "Effusion", "heart size", "localisation"]


def view(position: str = "AP") -> tuple[str, str]:
    return (f"Frontal {position} view.", "dicom.ViewPosition")


def urgent(location: str, minutes: int, **kw: object) -> Result:
    return make_result(
        location,
        "urgent",
        "",
        acquired=datetime.now(timezone.utc) - timedelta(minutes=minutes),
        patient_key=f"pk-{location}",
        sentences=[
            view(),
            ("Possible Pneumonia (0.91).", "findings.Pneumonia"),
            ("Model attention highest in both lower zones.", "zones"),
            ("Lung involvement: extent 6.5 of 8, opacity 4.5 of 6.", "severity"),
            ("High deterioration risk (0.83).", "risk"),
            ("Not assessed: Atelectasis, Effusion.", "manifest.not_assessed"),
            DISCLAIMER,
        ],
        findings=[("Pneumonia", 0.91, 0.6)],
        abnormal=0.97,
        extent=6.5,
        opacity=4.5,
        risk=0.83,
        zones=[("right", "lower", 0.71), ("left", "lower", 0.55)],
        not_assessed=["Atelectasis", "Effusion"],
        **kw,  # type: ignore[arg-type]
    )


def abnormal(location: str, minutes: int, **kw: object) -> Result:
    return make_result(
        location,
        "abnormal",
        "",
        acquired=datetime.now(timezone.utc) - timedelta(minutes=minutes),
        patient_key=f"pk-{location}",
        sentences=[
            view("PA"),
            ("Possible Lung Opacity (0.74).", "findings.Lung Opacity"),
            ("Lung involvement: extent 2.5 of 8.", "severity"),
            ("Low deterioration risk (0.22).", "risk"),
            ("Not assessed: " + ", ".join(NOT_ASSESSED) + ".", "manifest.not_assessed"),
            DISCLAIMER,
        ],
        findings=[("Lung Opacity", 0.74, 0.55)],
        extent=2.5,  # opacity not validated: null, so never shown
        risk=0.22,
        not_assessed=NOT_ASSESSED,
        heatmap=False,  # localisation not validated: no heatmap, no zones
        **kw,  # type: ignore[arg-type]
    )


def abnormal_unnamed(location: str, minutes: int, **kw: object) -> Result:
    return make_result(
        location,
        "abnormal",
        "",
        acquired=datetime.now(timezone.utc) - timedelta(minutes=minutes),
        sentences=[
            view("PA"),
            (
                "Abnormal appearance (score 0.71); no named finding above its operating point.",
                "abnormal",
            ),
            ("Cardiothoracic ratio 0.56: enlarged cardiac silhouette (at or above 0.50).", "cardiac"),
            DISCLAIMER,
        ],
        abnormal=0.71,
        cardiac=(0.56, 0.5),
        heatmap=False,
        **kw,  # type: ignore[arg-type]
    )


def normal(location: str, minutes: int, **kw: object) -> Result:
    return make_result(
        location,
        "normal",
        "",
        acquired=datetime.now(timezone.utc) - timedelta(minutes=minutes),
        sentences=[
            view("PA"),
            ("No abnormality detected above the operating point (score 0.12).", "abnormal"),
            ("Cardiothoracic ratio 0.46: heart size not enlarged (below 0.50).", "cardiac"),
            ("Not assessed: " + ", ".join(NOT_ASSESSED[:2]) + ".", "manifest.not_assessed"),
            DISCLAIMER,
        ],
        abnormal=0.12,
        cardiac=(0.46, 0.5),
        not_assessed=NOT_ASSESSED[:2],
        heatmap=False,
        **kw,  # type: ignore[arg-type]
    )


def refused(location: str, minutes: int, **kw: object) -> Result:
    return make_result(
        location,
        None,
        "",
        acquired=datetime.now(timezone.utc) - timedelta(minutes=minutes),
        status="refused",
        reason="not a frontal chest X-ray",
        sentences=[("Not read: not a frontal chest X-ray (lateral view 0.97).", "view.lateral"), DISCLAIMER],
        **kw,  # type: ignore[arg-type]
    )


def ward_results(beds: int, urgent_beds: int = 2) -> list[Result]:
    """`beds` results on distinct beds, `urgent_beds` of them urgent and spread over the ward (so the
    page has to bring them forward), the others a mix of the other kinds."""
    makers = [abnormal, normal, normal, abnormal_unnamed, normal, refused, abnormal, normal]
    urgent_at = {int((k + 0.5) * beds / urgent_beds) for k in range(urgent_beds)}
    out = []
    for i in range(beds):
        bay, bed = divmod(i, 6)
        location = f"Bay {bay + 1} Bed {bed + 1}"
        if i in urgent_at:
            out.append(urgent(location, 3 + i * 4))
        else:
            out.append(makers[i % len(makers)](location, 10 + i * 7))
    return out
