"""The whole configuration: one YAML file, validated strictly at start.

Unknown keys are refused and every error names the key and its YAML line (see yamlsource).
`cxr-appliance validate-config FILE` checks a file; `cxr-appliance schema` writes the JSON Schema
for editors. Secrets never live in the YAML itself: they come from a file or an environment variable.
The sections live in config_cart.py (the cart's own work) and config_network.py (the systems it talks
to); every one is importable from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from appliance.backends.settings import add_older_shape_to_schema
from appliance.config_base import Section
from appliance.config_cart import (
    DEFAULT_MODEL,
    DeviceConfig,
    DriftConfig,
    InferenceConfig,
    IngestConfig,
    JournalConfig,
    LoggingConfig,
    PrivacyConfig,
)
from appliance.config_network import (
    DicomNetConfig,
    DicomOutConfig,
    DicomTlsConfig,
    DisplayConfig,
    MetricsConfig,
    MqttConfig,
    PacsConfig,
    TlsConfig,
)
from appliance.yamlsource import validate_yaml

__all__ = [
    "DEFAULT_MODEL",
    "AppConfig",
    "DeviceConfig",
    "DicomNetConfig",
    "DicomOutConfig",
    "DicomTlsConfig",
    "DisplayConfig",
    "DriftConfig",
    "InferenceConfig",
    "IngestConfig",
    "JournalConfig",
    "LoggingConfig",
    "MetricsConfig",
    "MqttConfig",
    "PacsConfig",
    "PrivacyConfig",
    "TlsConfig",
    "config_json_schema",
    "load_config",
]


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
