"""The payloads the appliance publishes, as versioned data.

A result is plain data: interpret builds it, the journal stores it, publish only serialises it.
The JSON Schemas under appliance/schemas/ are generated from these classes
(`cxr-appliance schemas --out appliance/schemas`) and a test checks they are current.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator

from appliance import NOT_FOR_DIAGNOSTIC_USE

RESULT_SCHEMA: Final = "cxr-appliance/result/v2"
STATUS_SCHEMA: Final = "cxr-appliance/status/v1"
ACK_SCHEMA: Final = "cxr-appliance/ack/v2"
ACK_V1_SCHEMA: Final = "cxr-appliance/ack/v1"
THUMBNAIL_SCHEMA: Final = "cxr-appliance/thumbnail/v1"
HISTORY_REQUEST_SCHEMA: Final = "cxr-appliance/history-request/v1"
HISTORY_SCHEMA: Final = "cxr-appliance/history/v1"
# Request ids and patient keys name nothing but themselves: short, no topic or JSON metacharacters.
TOKEN_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"

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
    site_overlay: str | None = Field(
        None,
        description="Id (sha256) of the site recalibration overlay whose operating points decided this"
        " result; null: the model manifest's own.",
    )


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
    drift: list[str] = Field(
        default_factory=list,
        description="Monitored outputs whose recent distribution has drifted from the model's validation"
        " patients (PSI above drift.psi_threshold, docs/drift.md). A warning: the cart still reads.",
    )
    heartbeat_at: str | None = Field(
        None,
        description="When the cart sent this status (ISO 8601); it is sent again every heartbeat_seconds.",
    )
    heartbeat_seconds: float | None = Field(
        None, description="How often the cart repeats its status; three missed heartbeats = not reporting."
    )
    disclaimer: Literal["Not for diagnostic use"] = NOT_FOR_DIAGNOSTIC_USE

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# What displays sent before clinician feedback; still accepted (a kiosk may run the old page). No
# docstring: it would become the schema's description and change the published ack.v1.json.
class AcknowledgementV1(Payload):
    schema_: Literal["cxr-appliance/ack/v1"] = Field(ACK_V1_SCHEMA, alias="schema")
    message_id: str = Field(description="The result being acknowledged.")
    image_id: str | None = None
    by: str = Field(min_length=1, max_length=80, description="Who acknowledged (display user or initials).")
    at: str = Field(description="ISO 8601 time of acknowledgement.")
    display: str | None = Field(None, description="Which display sent it.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, title="Acknowledgement")


Verdict = Literal["agree", "disagree", "unsure"]
COMMENT_MAX: Final = 200
_SPACES = re.compile(r"\s+")


def clean_text(value: object) -> object:
    """Control and format characters (newlines, escapes, bidi overrides) become spaces, runs of space
    one: free text lands in a CSV and on every ward screen, where such characters could forge rows or
    reorder what a reader sees."""
    if not isinstance(value, str):
        return value
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in value)
    return _SPACES.sub(" ", text).strip()


class Acknowledgement(Payload):
    """A clinician's acknowledgement of a result, with their verdict on the AI reading (v2)."""

    schema_: Literal["cxr-appliance/ack/v2"] = Field(ACK_SCHEMA, alias="schema")
    message_id: str = Field(max_length=128, description="The result being acknowledged.")
    image_id: str | None = Field(None, max_length=128)
    by: str = Field(min_length=1, max_length=80, description="Who acknowledged (display user or initials).")
    at: str = Field(max_length=40, description="ISO 8601 time of acknowledgement.")
    display: str | None = Field(None, max_length=80, description="Which display sent it.")
    verdict: Verdict | None = Field(
        None, description="The clinician's view of the AI reading; null from v1 displays."
    )
    comment: str | None = Field(
        None,
        max_length=COMMENT_MAX,
        description="Optional short free text; control characters are replaced by spaces.",
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("by", "display", "comment", mode="before")
    @classmethod
    def _clean(cls, value: object) -> object:
        return clean_text(value)

    @field_validator("comment")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


def _ack_version(value: object) -> str | None:
    # v1 made "schema" optional (it had a default): an ack without one is v1.
    if isinstance(value, dict):
        return str(value.get("schema", ACK_V1_SCHEMA))
    return getattr(value, "schema_", None)


_ANY_ACK: TypeAdapter[Acknowledgement | AcknowledgementV1] = TypeAdapter(
    Annotated[
        Annotated[Acknowledgement, Tag(ACK_SCHEMA)] | Annotated[AcknowledgementV1, Tag(ACK_V1_SCHEMA)],
        Discriminator(_ack_version),
    ]
)


def parse_ack(payload: str | bytes | bytearray) -> Acknowledgement:
    """A v1 or v2 acknowledgement as v2 (a v1 one has no verdict). Raises pydantic.ValidationError."""
    ack = _ANY_ACK.validate_json(payload)
    if isinstance(ack, AcknowledgementV1):
        # Through v2 validation, so a v1 ack is bounded and cleaned like a new one.
        return Acknowledgement.model_validate(ack.model_dump(exclude={"schema_"}))
    return ack


class ThoraxBox(Payload):
    """The crop, as fractions of the image's width and height (0 = left/top edge, 1 = right/bottom)."""

    left: float = Field(ge=0, le=1)
    top: float = Field(ge=0, le=1)
    right: float = Field(ge=0, le=1)
    bottom: float = Field(ge=0, le=1)


class Thumbnail(Payload):
    """A small picture of the X-ray, cropped to the thorax (lung mask box plus a margin): corner labels
    and burned-in text lie outside it. Retained on its own per-bed topic, never inside a Result."""

    schema_: Literal["cxr-appliance/thumbnail/v1"] = Field(THUMBNAIL_SCHEMA, alias="schema")
    message_id: str = Field(description="The result this picture belongs to.")
    image_id: str
    site: str
    device_id: str
    location: str
    width: int = Field(ge=1, le=256)
    height: int = Field(ge=1, le=256)
    crop: ThoraxBox
    overlay: str | None = Field(
        None,
        description="The score the coloured overlay explains; null: the X-ray alone (localisation not"
        " validated for this model, or a normal reading).",
    )
    png_base64: str = Field(description="PNG: grey, or RGB with the overlay.")
    disclaimer: Literal["Not for diagnostic use"] = NOT_FOR_DIAGNOSTIC_USE

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HistoryRequest(Payload):
    """A display asks a cart for one patient's earlier results (read-only; answered from the journal)."""

    schema_: Literal["cxr-appliance/history-request/v1"] = Field(HISTORY_REQUEST_SCHEMA, alias="schema")
    request_id: str = Field(pattern=TOKEN_PATTERN)
    patient_key: str = Field(pattern=TOKEN_PATTERN, description="The salted pseudonym from a result.")
    limit: int = Field(20, ge=1, le=50)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HistoryPoint(Payload):
    """One earlier result of the patient: only what that result published."""

    message_id: str
    image_id: str
    location: str
    acquired_at: str | None = None
    created_at: str
    triage: TriageLevel | None = None
    extent: float | None = None
    extent_max: float = 8.0
    opacity: float | None = None
    opacity_max: float = 6.0
    risk: float | None = None


class History(Payload):
    schema_: Literal["cxr-appliance/history/v1"] = Field(HISTORY_SCHEMA, alias="schema")
    request_id: str
    site: str
    device_id: str
    patient_key: str
    points: list[HistoryPoint] = Field(default_factory=list, description="Oldest first.")
    disclaimer: Literal["Not for diagnostic use"] = NOT_FOR_DIAGNOSTIC_USE

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


SCHEMAS: dict[str, type[BaseModel]] = {
    "result.v2.json": Result,
    "status.v1.json": DeviceStatus,
    "ack.v1.json": AcknowledgementV1,
    "ack.v2.json": Acknowledgement,
    "thumbnail.v1.json": Thumbnail,
    "history-request.v1.json": HistoryRequest,
    "history.v1.json": History,
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
