"""The one protocol every inference backend implements.

A backend sees tensors, never files or MQTT. It is created from a model manifest and its own
config section, runs a batch, and says what it is (for the result's provenance).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    name: str  # "onnxruntime", "tensorrt"
    precision: str  # "fp32", "fp16", "int8"
    model_sha256: str  # sha256 of the ONNX the backend was built from
    max_batch: int
    fallback_reason: str | None  # set when this backend stands in for a preferred one

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch shaped as the manifest's input; return every output by name."""
        ...

    def close(self) -> None: ...
