"""TensorRT's settings: the `inference.backend` variant `{type: tensorrt, ...}` and auto's `tensorrt:` part.

Precision and batch are not here: `inference.precision` and `inference.max_batch` set them for every
backend, and the engine's optimisation profile is derived from them (see plan.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TensorRTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine_cache: Path | None = Field(None, description="Folder for engines; default engines/<model>/cache.")
    workspace_mb: int = Field(1024, ge=64)
    dla_core: int | None = Field(None, ge=0, description="Jetson DLA core, if the module has one.")
    build_if_missing: bool = Field(False, description="Build a missing engine at start (takes minutes).")
    require_parity: bool = Field(
        True,
        description="Load only engines whose sidecar records a passed tools/engines/check_parity.py run.",
    )
    device_index: int = Field(0, ge=0, description="CUDA device (always 0 on a Jetson).")


class TensorRTBackendConfig(TensorRTConfig):
    """`inference.backend: {type: tensorrt, ...}`: TensorRT or a plain error, never a fallback."""

    type: Literal["tensorrt"] = "tensorrt"
