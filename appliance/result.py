"""The payloads the appliance publishes, as versioned data.

A result is plain data: interpret builds it, the journal stores it, publish only serialises it.
The JSON Schemas under appliance/schemas/ are generated from these classes
(`cxr-appliance schemas --out appliance/schemas`) and a test checks they are current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance import NOT_FOR_DIAGNOSTIC_USE

RESULT_SCHEMA: Final = "cxr-appliance/result/v2"
STATUS_SCHEMA: Final = "cxr-appliance/status/v1"
ACK_SCHEMA: Final = "cxr-appliance/ack/v1"

Status = Literal["ok", "refused", "error"]
TriageLevel = Literal["urgent", "abnormal", "normal"]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Finding(Payload):
    label: str
    score: float = Field(ge=0, le=1)
    threshold: float | None = None
    positive: bool


class Score(Payload):
    score: float
    threshold: float | None = None
    positive: bool | None = None


class Severity(Payload):
    """Only the measures whose validation cleared the bar are filled; the others are null."""

    extent: float | None = Field(None, description="Geographic extent of lung involvement, 0-8.")
    extent_max: float = 8.0
    opacity: float | None = Field(None, description="Degree of opacity, 0-6.")
    opacity_max: float = 6.0


class CardiacSize(Payload):
    ratio: float = Field(ge=0, le=1.5, description="Cardiothoracic ratio from the heart and lung masks.")
    threshold: float = Field(description="Ratio at or above which the silhouette is called enlarged.")
    enlarged: bool
    projection_caveat: bool = Field(
        False, description="AP projection: the ratio overstates heart size and is worded with that caveat."
    )


class Risk(Payload):
    score: float = Field(ge=0, le=1, description="Probability of death, ICU admission or intubation.")
    threshold: float | None = None
    positive: bool | None = None
    method: Literal["single-image", "sequence"] = "single-image"
    single_image_score: float | None = Field(
        None, ge=0, le=1, description="With method 'sequence': this image's own risk, kept for later images."
    )


class Zone(Payload):
    side: Literal["right", "left"] = Field(description="Patient's side (image left is patient right).")
    level: Literal["upper", "middle", "lower"]
    involvement: float = Field(ge=0, le=1, description="Share of the zone's lung where the heatmap is high.")
    positive: bool


class Heatmap(Payload):
    label: str = Field(description="The score the heatmap explains.")
    width: int
    height: int
    png_base64: str = Field(description="8-bit grey PNG in image geometry (after letterbox removal).")


class Sentence(Payload):
    text: str
    source: str = Field(description="The model output this sentence traces to, e.g. 'findings.COVID-19'.")


class Trend(Payload):
    prior_image_id: str
    prior_acquired_at: str | None = None
    interval_hours: float | None = None
    extent_before: float | None = None
    extent_now: float | None = None
    opacity_before: float | None = None
    opacity_now: float | None = None
    risk_before: float | None = None
    risk_now: float | None = None
    direction: Literal["worse", "better", "unchanged"] | None = None


class Provenance(Payload):
    model: str
    model_version: str
    onnx_sha256: str
    backend: str
    precision: str
    appliance_version: str
    device_uid: str | None = Field(None, description="Algorithm identity; changes when the model changes.")
    fallback_reason: str | None = Field(None, description="Why the preferred backend is not in use.")


class ImageInfo(Payload):
    image_id: str = Field(description="Stable id of the image from acceptance to its last message.")
    source: str = Field(description="Where it came from: a folder name, 'usb', 'dicom-net'.")
    format: Literal["dicom", "png", "jpeg", "other"]
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    acquired_at: str | None = Field(None, description="ISO 8601 acquisition time when known.")
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None


class Result(Payload):
    schema_: Literal["cxr-appliance/result/v2"] = Field(RESULT_SCHEMA, alias="schema")
    message_id: str = Field(description="Unique per published result; subscribers de-duplicate on it.")
    created_at: str
    site: str
    device_id: str
    location: str = Field(description="Bed or location from config or DICOM tags.")
    patient_key: str | None = Field(None, description="Salted pseudonym; never the patient's name or ID.")
    image: ImageInfo
    status: Status
    reason: str | None = Field(None, description="Why refused or errored.")
    triage: TriageLevel | None = None
    view: Finding | None = None
    ood: Score | None = None
    abnormal: Score | None = None
    findings: list[Finding] = Field(default_factory=list)
    severity: Severity | None = None
    risk: Risk | None = None
    zones: list[Zone] = Field(default_factory=list)
    heatmap: Heatmap | None = None
    cardiac: CardiacSize | None = None
    not_assessed: list[str] = Field(
        default_factory=list, description="What this reading does not assess (unvalidated or out of scope)."
    )
    trend: Trend | None = None
    sentences: list[Sentence] = Field(default_factory=list)
    text: str
    provenance: Provenance
    timings_ms: dict[str, float] = Field(default_factory=dict)
    disclaimer: Literal["Not for diagnostic use"] = NOT_FOR_DIAGNOSTIC_USE

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=False)


class DeviceStatus(Payload):
    schema_: Literal["cxr-appliance/status/v1"] = Field(STATUS_SCHEMA, alias="schema")
    state: Literal["online", "offline", "degraded"]
    site: str
    device_id: str
    location: str | None = None
    since: str
    reason: str | None = None
    accepting: bool = True
    queue_depth: int = 0
    outbox_depth: int = 0
    model: str | None = None
    backend: str | None = None
    precision: str | None = None
    appliance_version: str | None = None
    disclaimer: Literal["Not for diagnostic use"] = NOT_FOR_DIAGNOSTIC_USE

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Acknowledgement(Payload):
    schema_: Literal["cxr-appliance/ack/v1"] = Field(ACK_SCHEMA, alias="schema")
    message_id: str = Field(description="The result being acknowledged.")
    image_id: str | None = None
    by: str = Field(min_length=1, max_length=80, description="Who acknowledged (display user or initials).")
    at: str = Field(description="ISO 8601 time of acknowledgement.")
    display: str | None = Field(None, description="Which display sent it.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


SCHEMAS: dict[str, type[BaseModel]] = {
    "result.v2.json": Result,
    "status.v1.json": DeviceStatus,
    "ack.v1.json": Acknowledgement,
}

SCHEMA_DIR = Path(__file__).parent / "schemas"


def json_schema(model: type[BaseModel]) -> dict[str, object]:
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def write_schemas(out_dir: Path = SCHEMA_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = out_dir / name
        path.write_text(json.dumps(json_schema(model), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
