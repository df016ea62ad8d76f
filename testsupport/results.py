"""Result payloads for publish/journal tests: schema-complete, varied, no real patient data."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from appliance.result import Finding, ImageInfo, Provenance, Result, Severity

T0 = datetime(2024, 3, 1, 8, 0, tzinfo=timezone.utc)


def make_result(
    n: int,
    *,
    location: str = "bed-1",
    patient_key: str | None = "0123456789abcdef",
    acquired_at: datetime | None = None,
    site: str = "site",
    device_id: str = "cart-1",
    triage: str = "normal",
) -> Result:
    """The n-th result of a run; message and image ids are unique per n (and stable for the same n)."""
    acquired = acquired_at or T0 + timedelta(minutes=n)
    score = (n % 100) / 100
    return Result.model_validate(
        {
            "message_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"test-result-{n}")),
            "created_at": (acquired + timedelta(seconds=30)).isoformat(),
            "site": site,
            "device_id": device_id,
            "location": location,
            "patient_key": patient_key,
            "image": ImageInfo(
                image_id=f"img-{n:06d}", source="inbox", format="dicom", acquired_at=acquired.isoformat()
            ),
            "status": "ok",
            "triage": triage,
            "findings": [Finding(label="Opacity", score=score, threshold=0.5, positive=score >= 0.5)],
            "severity": Severity(extent=score * 8, opacity=score * 6),
            "text": f"Result {n}: opacity score {score:.2f}.",
            "provenance": Provenance(
                model="test-model",
                model_version="0",
                onnx_sha256="0" * 64,
                backend="onnxruntime",
                precision="fp32",
                appliance_version="0.1.0",
            ),
            "timings_ms": {"infer": 1.0},
        }
    )
