"""Apply an output's declared activation, so models exporting logits or probabilities both work."""

from __future__ import annotations

import numpy as np

from appliance.manifest import OutputSpec


def sigmoid(values: np.ndarray) -> np.ndarray:
    """Logits to probabilities; clipped so an extreme logit cannot overflow exp()."""
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(values, -60.0, 60.0))))


def activate(spec: OutputSpec, values: np.ndarray) -> np.ndarray:
    """Return probabilities/values for one output of a whole batch (first axis = batch)."""
    values = np.asarray(values, dtype=np.float32)
    if spec.activation == "sigmoid":
        return sigmoid(values).astype(np.float32)
    if spec.activation == "softmax":
        shifted = values - values.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return values


def columns(spec: OutputSpec, values: np.ndarray) -> dict[str, np.ndarray]:
    """Activated output split by label: {label: (N,) array}. Unlabelled single outputs use spec.role."""
    activated = activate(spec, values).reshape(values.shape[0], -1)
    labels = spec.labels or [spec.role.value]
    if activated.shape[1] != len(labels):
        raise ValueError(f"output {spec.name} has {activated.shape[1]} columns but {len(labels)} labels")
    return {label: activated[:, index] for index, label in enumerate(labels)}
