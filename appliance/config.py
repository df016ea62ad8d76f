"""The whole configuration: one YAML file, validated strictly at start.

Unknown keys are refused and every error names the key and its YAML line (see yamlsource).
`cxr-appliance validate-config FILE` checks a file; `cxr-appliance schema` writes the JSON Schema
for editors. Secrets never live in the YAML itself: they come from a file or an environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, model_validator

from appliance.backends.select import AutoBackendConfig
from appliance.backends.settings import (
    BackendConfig,
    InferencePrecision,
    add_older_shape_to_schema,
    upgrade_inference,
)
from appliance.errors import ConfigError
from appliance.yamlsource import validate_yaml

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "engines" / "cxr-lite0" / "manifest.yaml"


def read_secret(path: Path, key: str) -> SecretStr:
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read: {exc.strerror}") from exc


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        description="After this, the spool forgets a finished image's original path and deletes its meta"
        " file; only the de-duplication key stays (a re-send is still recognised).",
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


class TlsConfig(Section):
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Client key (mutual TLS).")
    insecure_skip_verify: bool = Field(False, description="Never on a ward network; for bench tests only.")


class MqttConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, description="Default: cxr-<site>-<device_id>.")
    username: str | None = None
    password_file: Path | None = Field(None, description="File holding the password (mode 0600).")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    tls: TlsConfig | None = None
    topic_prefix: str = Field(
        "cxr", description="Topics: <prefix>/<site>/<device_id>/{status,result,latest/<bed>}."
    )
    keepalive: int = Field(30, ge=5, le=3600)
    qos: Literal[0, 1, 2] = 1
    outbox_max: int = Field(
        100_000, ge=100, description="Outbox bound; beyond it the oldest unsent result is dropped and logged."
    )
    reconnect_max_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(
        30.0,
        ge=5,
        le=3600,
        description="The retained status is sent again this often even when nothing changed: a display"
        " shows a cart as not reporting after three missed heartbeats (a hung cart or a cut network that"
        " the broker's last will has not noticed yet).",
    )
    publish_heatmap: bool = Field(True, description="Include the heatmap PNG (a few kB) in the result.")
    publish_thumbnail: bool = Field(
        True,
        description="Publish a <=256 px X-ray cropped to the thorax (no corner labels or burned-in text),"
        " retained on <prefix>/<site>/<device_id>/thumbnail/<bed>; on by default: it carries no identifying"
        " text and shows the ward which image a result belongs to.",
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def password(self) -> SecretStr | None:
        if self.password_file:
            try:
                return SecretStr(self.password_file.read_text(encoding="utf-8").strip())
            except OSError as exc:
                raise ConfigError(
                    f"mqtt.password_file {self.password_file}: cannot read: {exc.strerror}"
                ) from exc
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: environment variable {self.password_env} is not set")
            return SecretStr(value)
        return None


class PrivacyConfig(Section):
    salt_file: Path = Field(
        Path("/var/lib/cxr-appliance/patient-key.salt"),
        description="Secret salt for pseudonymous patient keys; created (random) if missing.",
    )
    publish_patient_key: bool = Field(True, description="Publish the salted pseudonym (needed for trends).")


class JournalConfig(Section):
    path: Path = Field(Path("/var/lib/cxr-appliance/journal.sqlite3"))
    retention_days: float = Field(90, gt=0, description="Results older than this are pruned.")
    retention_count: int = Field(100_000, ge=100, description="At most this many results are kept.")


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = Field("text", description="json: one object per line for log shippers.")


class DisplayConfig(Section):
    host: str = Field("127.0.0.1", description="Address `cxr-appliance display` serves the ward page on.")
    port: int = Field(8080, ge=1, le=65535)
    broker_ws_url: str = Field(
        "ws://127.0.0.1:9001", description="Mosquitto WebSockets URL the page connects to."
    )
    site: str = Field("+", description="Which site's carts to show ('+' = every site on the broker).")
    name: str | None = Field(None, description="This display's name, sent with acknowledgements.")
    username: str | None = Field(
        None, description="The broker's display account (reads results, writes acks)."
    )
    password_file: Path | None = Field(
        None, description="Password of the display account (served to the page)."
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names the ward page is served under (e.g. the monitor's URL name); requests"
        " naming another host get 421 (DNS rebinding). None: loopback, this machine's names and `host`.",
    )

    def password(self) -> SecretStr | None:
        return read_secret(self.password_file, "display.password_file") if self.password_file else None


class DicomTlsConfig(Section):
    cert_file: Path = Field(description="PEM certificate this end presents.")
    key_file: Path = Field(description="PEM private key of cert_file.")
    ca_file: Path | None = Field(
        None,
        description="CA that signed the peer's certificate; given: the peer must present one (mutual TLS).",
    )


class DicomNetConfig(Section):
    enabled: bool = False
    ae_title: str = Field(
        "CXR_APPLIANCE", max_length=16, description="Our AE title; associations calling another are refused."
    )
    port: int = Field(11112, ge=1, le=65535)
    bind: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback keeps the receiver off the network: give the cart's"
        " address on the modality network explicitly (and consider tls).",
    )
    allowed_calling_ae: list[str] = Field(
        default_factory=list,
        description="Calling AE titles of the X-ray units allowed to send; required when enabled"
        " (no 'accept any' setting).",
    )
    receive_dir: Path | None = Field(
        None,
        description="Where received instances are written before the spool takes them "
        "(default: <ingest.spool>/dicom-in; keep it on the spool's filesystem).",
    )
    tls: DicomTlsConfig | None = Field(None, description="Accept DICOM over TLS only (server certificate).")

    @model_validator(mode="after")
    def _senders_listed(self) -> DicomNetConfig:
        # An empty list would let anything on the network that reaches the port store images.
        if self.enabled and not [t for t in self.allowed_calling_ae if t.strip()]:
            raise ValueError("allowed_calling_ae must list the X-ray units' AE titles when enabled")
        return self


class PacsConfig(Section):
    ae_title: str = Field(max_length=16, description="The PACS's AE title (called AE).")
    host: str = Field(description="PACS host name or address.")
    port: int = Field(104, ge=1, le=65535)
    calling_ae_title: str | None = Field(None, max_length=16, description="Default: dicom_net.ae_title.")
    timeout_seconds: float = Field(30.0, gt=0, description="Connection and response timeout.")
    retry_min_seconds: float = Field(5.0, gt=0, description="First wait after the PACS could not be reached.")
    retry_max_seconds: float = Field(
        300.0, gt=0, description="Longest wait between retries (backoff doubles)."
    )
    ca_file: Path | None = Field(None, description="Given: connect over TLS, trusting this CA.")
    failed_retries: int = Field(
        5,
        ge=0,
        description="How often a file the PACS refused (kept in failed/) is sent again before it stays there.",
    )
    failed_retry_seconds: float = Field(
        600.0,
        gt=0,
        description="First wait before a refused file is sent again (doubles each time, at most a day).",
    )


class DicomOutConfig(Section):
    enabled: bool = Field(False, description="Write a DICOM SR and Secondary Capture for each DICOM input.")
    outbox: Path = Field(
        Path("/var/lib/cxr-appliance/dicom-out"),
        description="Folder for the SR/SC files; queue/ inside holds those not yet accepted by the PACS.",
    )
    secondary_capture: bool = Field(True, description="Also write the image with the heatmap overlay.")
    manufacturer: str = Field("CXR appliance", description="Manufacturer written into the objects.")
    pacs: PacsConfig | None = Field(None, description="Send the objects by C-STORE here (None: folder only).")
    keep_days: float = Field(
        30, ge=0, description="Written SR/SC files are deleted after this, unless still queued for the PACS."
    )
    keep_unsent_days: float = Field(
        90,
        ge=0,
        description="Files the PACS never accepted (queue/, failed/) are deleted after this, with an error"
        " in the log.",
    )


class MetricsConfig(Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics at http://<host>:<port>/metrics.")
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Loopback keeps the metrics on the cart; give the cart's address on the"
        " monitoring network (or 0.0.0.0) only for a Prometheus elsewhere, and then set username/password_file.",
    )
    port: int = Field(9108, ge=1, le=65535, description="TCP port of the metrics endpoint.")
    username: str | None = Field(None, description="Given: HTTP basic auth with this user is required.")
    password_file: Path | None = Field(
        None, description="File holding the basic-auth password (mode 0600); never the YAML itself."
    )

    @model_validator(mode="after")
    def _auth_complete(self) -> MetricsConfig:
        if bool(self.username) != bool(self.password_file):
            raise ValueError("basic auth needs both username and password_file")
        return self

    def password(self) -> SecretStr | None:
        return read_secret(self.password_file, "metrics.password_file") if self.password_file else None


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


class AppConfig(Section):
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    display: DisplayConfig = Field(default_factory=DisplayConfig)
    dicom_net: DicomNetConfig = Field(default_factory=DicomNetConfig)
    dicom_out: DicomOutConfig = Field(default_factory=DicomOutConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)

    def resolve_paths(self, base: Path) -> AppConfig:
        """Relative paths in the YAML are relative to the YAML file's folder."""

        def fix(value: object) -> object:
            if isinstance(value, Path) and not value.is_absolute():
                return (base / value).resolve()
            if isinstance(value, list):
                return [fix(v) for v in value]
            if isinstance(value, BaseModel):
                return value.model_copy(update={k: fix(getattr(value, k)) for k in type(value).model_fields})
            return value

        resolved = fix(self)
        assert isinstance(resolved, AppConfig)
        return resolved


def load_config(path: Path) -> AppConfig:
    path = Path(path)
    return validate_yaml(AppConfig, path).resolve_paths(path.parent.resolve())


def config_json_schema() -> dict[str, object]:
    schema = AppConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "cxr-appliance configuration"
    # The bundled model's default path depends on where the appliance is installed; say so, not one path.
    inference = schema["$defs"]["InferenceConfig"]["properties"]
    inference["model"]["default"] = "<install dir>/engines/cxr-lite0/manifest.yaml"
    add_older_shape_to_schema(inference)
    return schema
