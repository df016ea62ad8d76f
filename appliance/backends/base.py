"""The one protocol every inference backend implements.

A backend sees tensors, never files or MQTT. It is created from a model manifest and its own
config section (the `inference.backend` variant whose class lives in the backend's file), runs a
batch, and says what it is (for the result's provenance).

The batch contract, stated here once for every backend:

- `run(batch)` takes N >= 1 preprocessed images stacked on a leading batch axis:
  shape `(N, *manifest.input.sample_shape)`, float32 (a backend casts to its model's input dtype).
- It returns every output the manifest names (more are allowed), each a float32 array whose first
  axis is the same N, row i belonging to image i.
- N is not bounded by `max_batch`: a backend whose model or engine has a fixed or bounded batch
  (a TensorRT profile's max, a Triton server's max_batch_size) splits the batch into chunks of at
  most `max_batch` and concatenates the outputs in order. A dynamic-batch model runs N at once.
- `max_batch` is what the caller should aim for (the daemon claims that many from a backlog);
  it is `inference.max_batch`, lowered only where the engine or server accepts less.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    name: str  # "onnxruntime", "tensorrt", "triton"
    precision: str  # "fp32", "fp16", "int8", "best" (TensorRT FP16+INT8 kernels)
    model_sha256: str  # sha256 of the ONNX the backend was built from
    max_batch: int  # largest batch run in one call to the model (see the batch contract above)
    fallback_reason: str | None  # set when this backend stands in for a preferred one

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(N, *sample_shape) in, {output name: (N, ...) float32} out; any N >= 1 (see the module doc)."""
        ...

    def close(self) -> None: ...
