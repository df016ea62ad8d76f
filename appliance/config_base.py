"""What every configuration section shares: strict keys, and secrets read from their own files."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr

from appliance.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def read_secret(path: Path, key: str) -> SecretStr:
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read: {exc.strerror}") from exc
