"""Pick the inference backend: `auto` prefers a verified TensorRT engine and falls back loudly.

auto         TensorRT when an engine built for this device (and parity-checked, unless
             tensorrt.require_parity is off) is in the cache, or can be built at start; otherwise
             ONNX Runtime, with `fallback_reason` set (it travels in every result's provenance)
             and a WARNING in the log.
tensorrt     the same, but failure to use TensorRT is an error that names the reason.
onnxruntime  ONNX Runtime only.
triton       a Triton Inference Server (inference.triton); only when named, never by auto, and
             failure is an error naming the URL (a cart silently computing locally would hide an
             outage of the site's server).
"""

from __future__ import annotations

import logging

from appliance.backends.base import Backend
from appliance.backends.onnxruntime import OnnxRuntimeBackend
from appliance.backends.tensorrt import (
    TensorRTBackend,
    TensorRTConfig,
    build_engine,
    cache_dir_for,
    current_device,
    plan_engine,
)
from appliance.backends.triton import TritonBackend
from appliance.config import InferenceConfig
from appliance.engine_cache import EngineMismatch, EngineRecord, find_engine
from appliance.errors import BackendUnavailable, UserError
from appliance.manifest import Manifest, Precision

log = logging.getLogger(__name__)


class TensorRTRequired(UserError, BackendUnavailable):
    """inference.backend is `tensorrt` and TensorRT cannot be used: shown plainly, no fallback."""


class TritonUnavailable(UserError, BackendUnavailable):
    """inference.backend is `triton` and the server or its model cannot be used: shown plainly."""


def create_backend(manifest: Manifest, inference: InferenceConfig) -> Backend:
    if inference.backend == "onnxruntime":
        return _onnxruntime(manifest, inference)
    if inference.backend == "triton":
        return open_triton(manifest, inference)
    try:
        return open_tensorrt(manifest, inference.tensorrt)
    except (BackendUnavailable, UserError) as exc:
        if inference.backend == "tensorrt":
            raise TensorRTRequired(
                f"inference.backend is 'tensorrt' but TensorRT cannot be used here: {exc}."
                " Set inference.backend: auto to fall back to ONNX Runtime."
            ) from exc
        reason = f"TensorRT not used: {exc}"
    backend = _onnxruntime(manifest, inference)
    backend.fallback_reason = reason
    log.warning("*** FALLBACK to ONNX Runtime (%s): %s ***", backend.precision, reason)
    return backend


def open_triton(manifest: Manifest, inference: InferenceConfig) -> TritonBackend:
    config = inference.triton
    try:
        return TritonBackend(manifest, config, inference.max_batch)
    except BackendUnavailable as exc:
        raise TritonUnavailable(
            f"inference.backend is 'triton' but the Triton server at {config.url} ({config.protocol})"
            f" cannot be used: {exc}"
        ) from exc


def _onnxruntime(manifest: Manifest, inference: InferenceConfig) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(
        manifest, Precision(inference.precision), inference.onnxruntime, inference.max_batch
    )


def open_tensorrt(manifest: Manifest, config: TensorRTConfig) -> TensorRTBackend:
    """The verified engine for this device, built first when allowed; BackendUnavailable says why not."""
    device = current_device(config.device_index)
    plan = plan_engine(manifest, config, device)
    try:
        engine_path, record = find_engine(cache_dir_for(manifest, config), plan.spec, device)
    except EngineMismatch as exc:
        if not config.build_if_missing:
            raise EngineMismatch(f"{exc}; build it with tools/build_engine.py") from exc
        log.warning("no usable engine (%s); building one now, this takes minutes", exc)
        record = build_engine(plan, progress=log.info)
        engine_path = plan.engine_path
    refusal = parity_refusal(record, config)
    if refusal:
        raise BackendUnavailable(f"{engine_path}: {refusal}")
    return TensorRTBackend(manifest, engine_path, record, config.device_index)


def parity_refusal(record: EngineRecord, config: TensorRTConfig) -> str | None:
    """Why a key-matching engine still must not run (parity gate), or None."""
    if not config.require_parity:
        return None
    if record.parity is None:
        return "engine has not passed the parity check yet; run tools/check_parity.py --record"
    if not record.parity.passed:
        return (
            f"engine FAILED the parity check on {record.parity.checked_at} (report: {record.parity.report})"
        )
    return None
