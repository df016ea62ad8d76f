"""Configuration sections for the cart's own work: who it is, what it takes in, how it reads images,
what it keeps and how it watches itself. (How it talks to other systems: config_network.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, model_validator

from appliance.backends.select import AutoBackendConfig
from appliance.backends.settings import BackendConfig, InferencePrecision, upgrade_inference
from appliance.config_base import Section

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "engines" / "cxr-lite0" / "manifest.yaml"


class DeviceConfig(Section):
    site: str = Field("site", pattern=r"^[A-Za-z0-9_-]+$", description="Hospital or ward; first topic level.")
    device_id: str = Field("cart-1", pattern=r"^[A-Za-z0-9_-]+$", description="This cart; unique per site.")
    location: str = Field("unassigned", description="Default bed/location when the image does not name one.")
    location_from_dicom: bool = Field(
        True,
        description="Use the DICOM's Current Patient Location (or StationName) as bed when it is listed in"
        " `locations`.",
    )
    locations: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9._ -]{1,64}$")]] = Field(
        default_factory=dict,
        description="DICOM location -> published bed name, e.g. {'Ward7 Bed3': 'bed-3'} (matched ignoring"
        " case and repeated spaces). A DICOM location not listed is replaced by `location` and never"
        " published or logged: the field is free text and may hold a patient's name.",
    )

    def bed_for(self, dicom_location: str | None) -> str | None:
        """The configured bed name for a DICOM location; None when it is not on the list."""
        if not dicom_location or not self.location_from_dicom:
            return None
        wanted = _location_key(dicom_location)
        return next((bed for raw, bed in self.locations.items() if _location_key(raw) == wanted), None)


def _location_key(value: str) -> str:
    return " ".join(value.split()).casefold()


class IngestConfig(Section):
    watch: Path = Field(Path("/var/lib/cxr-appliance/inbox"), description="Folder the X-ray unit drops into.")
    extra_watch: list[Path] = Field(default_factory=list, description="More folders, e.g. a USB mount point.")
    spool: Path = Field(
        Path("/var/lib/cxr-appliance/spool"), description="incoming/processing/done/quarantine."
    )
    delete_from_watch: bool = Field(
        True, description="Move files out of watched folders (False: copy; for read-only media)."
    )
    stable_seconds: float = Field(
        2.0, ge=0, description="Without inotify close-write: size/mtime must hold still this long."
    )
    poll_seconds: float = Field(1.0, gt=0, description="Rescan interval (also catches missed events).")
    extensions: list[str] = Field(
        default_factory=lambda: [".dcm", ".dicom", "", ".png", ".jpg", ".jpeg"],
        description="Accepted file name endings ('' = no extension, common for DICOM).",
    )
    max_file_mb: float = Field(512, gt=0, description="Larger files are quarantined unread.")
    max_pixels: int = Field(
        60_000_000, gt=0, description="Images declaring more pixels are refused before decoding."
    )
    min_free_mb: float = Field(
        200, ge=0, description="Stop accepting when the spool disk has less free space."
    )
    keep_done_days: float = Field(7, ge=0, description="Processed files are deleted from done/ after this.")
    keep_quarantine_days: float = Field(
        30, ge=0, description="Refused files (and their reasons) are deleted from quarantine/ after this."
    )
    keep_records_days: float = Field(
        30,
        ge=0,
        description="After this, the spool forgets a finished image's original path (it may name the"
        " patient); only the de-duplication key stays (a re-send is still recognised).",
    )


class InferenceConfig(Section):
    model: Path = Field(DEFAULT_MODEL, description="Model manifest (YAML) or its folder.")
    backend: BackendConfig = Field(
        default_factory=AutoBackendConfig,
        description="A name or {type: NAME, ...settings}. auto: TensorRT when an engine for this device"
        " exists, else ONNX Runtime (settings: tensorrt, onnxruntime); onnxruntime; tensorrt: no fallback;"
        " triton: a Triton Inference Server (url, ...), never chosen by auto.",
    )
    precision: InferencePrecision = Field(
        "auto",
        description="For whichever backend runs. auto: ONNX Runtime fp32, TensorRT fp16 engine; fp32: ONNX"
        " Runtime only; fp16/int8: that ONNX (int8 if the model ships one that passed its gate) or engine;"
        " best: TensorRT FP16+INT8 kernels (ONNX Runtime runs the int8 ONNX). Triton: the server's.",
    )
    max_batch: int = Field(
        4,
        ge=1,
        le=64,
        description="Images batched together when a backlog waits; TensorRT engines are built for 1..max_batch.",
    )
    site_overlay: Path | None = Field(
        None,
        description="Site operating points from `cxr-appliance recalibrate` (YAML); replaces the manifest's"
        " thresholds. Refused at start/reload if made for another model. None: the shipped points.",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_shape(cls, data: object, info: ValidationInfo) -> object:
        # `backend: NAME` and the sibling onnxruntime/tensorrt/triton sections of older configs.
        return upgrade_inference(data, info.context)


class PrivacyConfig(Section):
    salt_file: Path = Field(
        Path("/var/lib/cxr-appliance/patient-key.salt"),
        description="Secret salt for pseudonymous patient keys; created (random) if missing.",
    )
    publish_patient_key: bool = Field(True, description="Publish the salted pseudonym (needed for trends).")


class JournalConfig(Section):
    path: Path = Field(
        Path("/var/lib/cxr-appliance/journal.sqlite3"),
        description=(
            "The appliance's database (SQLite, WAL): the journal (results, acknowledgements), the spool's"
            " state and the MQTT outbox; `history`, `feedback` and `recalibrate` read it."
        ),
    )
    retention_days: float = Field(90, gt=0, description="Results older than this are pruned.")
    retention_count: int = Field(100_000, ge=100, description="At most this many results are kept.")


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = Field("text", description="json: one object per line for log shippers.")


class DriftConfig(Section):
    """The drift watch (docs/drift.md): recent images against the manifest's validation distributions.

    A warning, never a fault: the cart keeps reading. PSI conventions: < 0.1 no real change,
    0.1-0.25 moderate, > 0.25 significant."""

    enabled: bool = Field(True, description="Watch when the model's manifest carries a drift reference.")
    window: int = Field(
        200,
        ge=10,
        description="Most recent observations kept per quantity. 200 keeps the no-shift PSI of 10 bins"
        " near 0.05 (sampling noise ~ bins/window), far under the threshold.",
    )
    min_images: int = Field(
        100, ge=10, description="Observations a quantity needs before it is judged at all."
    )
    psi_threshold: float = Field(
        0.25, gt=0, description="PSI above this raises drift for the quantity (0.25: significant shift)."
    )
    psi_clear: float = Field(
        0.1, ge=0, description="A drifted quantity clears only below this (hysteresis; 0.1: no real change)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DriftConfig:
        if self.min_images > self.window:
            raise ValueError("min_images must not exceed window")
        if self.psi_clear >= self.psi_threshold:
            raise ValueError("psi_clear must be below psi_threshold")
        return self
