"""TensorRT backend for Jetson carts (placeholder config; the engine path is built in its own issue)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class TensorRTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: str = Field("fp16", pattern="^(fp16|int8|best)$", description="Engine precision on the device.")
    engine_cache: Path | None = Field(None, description="Folder for engines; default engines/<model>/cache.")
    workspace_mb: int = Field(1024, ge=64)
    opt_batch: int = Field(1, ge=1)
    max_batch: int = Field(4, ge=1)
    dla_core: int | None = Field(None, ge=0, description="Jetson DLA core, if the module has one.")
    build_if_missing: bool = Field(False, description="Build a missing engine at start (takes minutes).")
