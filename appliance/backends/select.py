"""Pick the inference backend: `auto` prefers a verified TensorRT engine and falls back loudly.

`inference.backend` is one of these variants, told apart by `type` (each backend's file owns its
class; `backend: NAME` is short for `backend: {type: NAME}`):

auto         TensorRT when an engine built for this device (and parity-checked, unless
             tensorrt.require_parity is off) is in the cache, or can be built at start; otherwise
             ONNX Runtime, with `fallback_reason` set (it travels in every result's provenance)
             and a WARNING in the log. Settings: `tensorrt:` and `onnxruntime:` (AutoBackendConfig).
tensorrt     the same, but failure to use TensorRT is an error that names the reason.
onnxruntime  ONNX Runtime only.
triton       a Triton Inference Server; only when named, never by auto, and failure is an error
             naming the URL (a cart silently computing locally would hide an outage of the site's
             server).

`inference.precision` and `inference.max_batch` apply to whichever backend runs (see
onnxruntime_precision and tensorrt.plan.engine_precision for what `auto` and `best` mean to each).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.backends.base import Backend
from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.backends.tensorrt import TensorRTConfig, open_tensorrt, parity_refusal
from appliance.backends.triton import TritonBackend, TritonConfig
from appliance.errors import BackendUnavailable, UserError
from appliance.manifest import Manifest, Precision

if TYPE_CHECKING:  # config_cart.py imports this module for AutoBackendConfig
    from appliance.config_cart import InferenceConfig

log = logging.getLogger(__name__)

__all__ = [
    "AutoBackendConfig",
    "TensorRTRequired",
    "TritonUnavailable",
    "create_backend",
    "onnxruntime_precision",
    "onnxruntime_settings",
    "open_tensorrt",  # re-exported: tools and tests open an engine through here
    "open_triton",
    "parity_refusal",
    "tensorrt_settings",
]


class AutoBackendConfig(BaseModel):
    """`inference.backend: {type: auto, tensorrt: {...}, onnxruntime: {...}}`: both, since auto may use either."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["auto"] = "auto"
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    onnxruntime: OnnxRuntimeConfig = Field(default_factory=OnnxRuntimeConfig)


class TensorRTRequired(UserError, BackendUnavailable):
    """inference.backend is `tensorrt` and TensorRT cannot be used: shown plainly, no fallback."""


class TritonUnavailable(UserError, BackendUnavailable):
    """inference.backend is `triton` and the server or its model cannot be used: shown plainly."""


def onnxruntime_precision(precision: str) -> Precision:
    """Which ONNX file ONNX Runtime loads: auto is the FP32 model; best (a TensorRT mix) the INT8 one."""
    return Precision({"auto": "fp32", "best": "int8"}.get(precision, precision))


def tensorrt_settings(inference: InferenceConfig) -> TensorRTConfig:
    """The TensorRT settings the chosen backend carries (defaults where it carries none)."""
    backend = inference.backend
    if isinstance(backend, TensorRTConfig):
        return backend
    return backend.tensorrt if isinstance(backend, AutoBackendConfig) else TensorRTConfig()


def onnxruntime_settings(inference: InferenceConfig) -> OnnxRuntimeConfig:
    backend = inference.backend
    if isinstance(backend, OnnxRuntimeConfig):
        return backend
    return backend.onnxruntime if isinstance(backend, AutoBackendConfig) else OnnxRuntimeConfig()


def create_backend(manifest: Manifest, inference: InferenceConfig) -> Backend:
    kind = inference.backend.type
    if kind == "onnxruntime":
        return _onnxruntime(manifest, inference)
    if isinstance(inference.backend, TritonConfig):
        return open_triton(manifest, inference.backend, inference.max_batch)
    try:
        return open_tensorrt(manifest, tensorrt_settings(inference), inference.precision, inference.max_batch)
    except (BackendUnavailable, UserError) as exc:
        if kind == "tensorrt":
            raise TensorRTRequired(
                f"inference.backend is 'tensorrt' but TensorRT cannot be used here: {exc}."
                " Set inference.backend: auto to fall back to ONNX Runtime."
            ) from exc
        reason = f"TensorRT not used: {exc}"
    backend = _onnxruntime(manifest, inference)
    backend.fallback_reason = reason
    log.warning("*** FALLBACK to ONNX Runtime (%s): %s ***", backend.precision, reason)
    return backend


def open_triton(manifest: Manifest, config: TritonConfig, max_batch: int = 4) -> TritonBackend:
    try:
        return TritonBackend(manifest, config, max_batch)
    except BackendUnavailable as exc:
        raise TritonUnavailable(
            f"inference.backend is 'triton' but the Triton server at {config.url} ({config.protocol})"
            f" cannot be used: {exc}"
        ) from exc


def _onnxruntime(manifest: Manifest, inference: InferenceConfig) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(
        manifest,
        onnxruntime_precision(inference.precision),
        onnxruntime_settings(inference),
        inference.max_batch,
    )
