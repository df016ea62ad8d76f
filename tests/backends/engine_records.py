"""A build spec and a Jetson identity shared by the engine-cache and backend-selection tests."""

from __future__ import annotations

from appliance.engine_cache import BuildSpec, DeviceIdentity

SPEC = BuildSpec(
    model="tiny",
    onnx_sha256="a" * 64,
    precision="fp16",
    input_name="image",
    input_shape=(1, 64, 64),
    opt_batch=1,
    max_batch=4,
    workspace_mb=1024,
)
ORIN = DeviceIdentity(
    gpu_name="Orin", compute_capability="8.7", tensorrt_version="10.3.0", l4t_release="R36.4.3"
)
