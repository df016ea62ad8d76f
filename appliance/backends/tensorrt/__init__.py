"""TensorRT backend for Jetson carts, as composable loaders (Polygraphy's shape).

    config.py  TensorRTConfig: the settings; TensorRTBackendConfig: `inference.backend: {type: tensorrt}`
    plan.py    manifest + settings + device -> EnginePlan (ONNX, flags, profile, cache key); pure
    build.py   EnginePlan -> ONNX -> network -> serialized engine + sidecar in the cache
    cache.py   EnginePlan <-> engine cache: find the verified engine, build it when allowed, parity gate
    runner.py  engine -> outputs: execution context, bindings, CUDA stream (appliance.backends.cuda)

Written to the TensorRT 10 Python API (JetPack 6); TensorRT 8.5/8.6 (JetPack 5) works through the
same named-tensor calls, and older 8.x through the bindings API. TensorRT and pycuda are imported
inside functions, so this package imports everywhere and `doctor` can say plainly what is missing.
Errors a person can fix (bad settings, an ONNX TensorRT refuses) are UserError; a device or engine
that cannot be used here is BackendUnavailable.
"""

from __future__ import annotations

from appliance.backends.tensorrt.build import BuildFailed, build_engine
from appliance.backends.tensorrt.cache import cached_engine, open_tensorrt, parity_refusal
from appliance.backends.tensorrt.config import TensorRTBackendConfig, TensorRTConfig
from appliance.backends.tensorrt.plan import (
    OPT_BATCH,
    EnginePlan,
    cache_dir_for,
    calibration_id_for,
    current_device,
    engine_precision,
    import_tensorrt,
    major_version,
    plan_engine,
    trtexec_command,
)
from appliance.backends.tensorrt.runner import TensorRTBackend

__all__ = [
    "OPT_BATCH",
    "BuildFailed",
    "EnginePlan",
    "TensorRTBackend",
    "TensorRTBackendConfig",
    "TensorRTConfig",
    "build_engine",
    "cache_dir_for",
    "cached_engine",
    "calibration_id_for",
    "current_device",
    "engine_precision",
    "import_tensorrt",
    "major_version",
    "open_tensorrt",
    "parity_refusal",
    "plan_engine",
    "trtexec_command",
]
