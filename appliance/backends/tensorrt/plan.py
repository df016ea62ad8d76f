"""What to build and where, decided without TensorRT (so --dry-run can show it anywhere).

plan_engine is pure: which ONNX, which builder flags, which optimisation profile and which cache key
for `inference.precision` and `inference.max_batch` on a device. trtexec_command writes the same
plan as a command line. current_device is the one step here that needs TensorRT and a GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from appliance.backends.cuda import gpu_info
from appliance.backends.tensorrt.config import TensorRTConfig
from appliance.engine_cache import (
    BuildSpec,
    DeviceIdentity,
    cache_key,
    engine_paths,
    read_board,
    read_l4t_release,
    timing_cache_path,
)
from appliance.errors import BackendUnavailable, ManifestError, UserError
from appliance.manifest import Manifest, Precision

# The profile's optimum: a ward sends one image at a time; batches only form behind a backlog.
OPT_BATCH = 1
EnginePrecision = Literal["fp16", "int8", "best"]
Int8Source = Literal["qdq", "calibration"]
_ENGINE_PRECISION: dict[str, EnginePrecision] = {
    "auto": "fp16",
    "fp16": "fp16",
    "int8": "int8",
    "best": "best",
}
_INT8_SOURCES: dict[str, Int8Source] = {"qdq": "qdq", "calibration": "calibration"}
_FLAGS = {"fp16": ["FP16"], "int8": ["INT8"], "best": ["FP16", "INT8"]}


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt  # lazy: only Jetsons and GPU hosts have it
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing under the wheel
        raise BackendUnavailable(f"TensorRT Python package not importable: {exc}") from exc
    return tensorrt


def major_version(version: str) -> int:
    return int(version.split(".", 1)[0])


def current_device(device_index: int = 0) -> DeviceIdentity:
    """This machine's identity for cache keys; needs TensorRT and a CUDA GPU."""
    trt = import_tensorrt()
    gpu = gpu_info(device_index)
    return DeviceIdentity(
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=str(trt.__version__),
        l4t_release=read_l4t_release(),
        board=read_board(),
        memory_mb=gpu.total_memory_mb,
    )


def cache_dir_for(manifest: Manifest, config: TensorRTConfig) -> Path:
    return config.engine_cache if config.engine_cache is not None else manifest.folder / "cache"


def engine_precision(precision: str) -> EnginePrecision:
    """The engine precision for `inference.precision`: auto builds FP16, fp32 has no engine here."""
    built_as = _ENGINE_PRECISION.get(precision)
    if built_as is None:
        raise UserError(
            f"inference.precision {precision}: TensorRT engines are built as fp16, int8 or best"
            " (auto = fp16); fp32 runs on ONNX Runtime"
        )
    return built_as


@dataclass(frozen=True)
class EnginePlan:
    """One engine to build or find: its ONNX, builder settings, cache key and cache files."""

    onnx_path: Path
    spec: BuildSpec
    device: DeviceIdentity
    key: str
    engine_path: Path
    sidecar_path: Path
    timing_cache: Path
    calibration_cache: Path | None  # TensorRT 8.x entropy calibration only

    @property
    def flags(self) -> list[str]:
        return _FLAGS[self.spec.precision]


def plan_engine(
    manifest: Manifest,
    config: TensorRTConfig,
    device: DeviceIdentity,
    precision: str = "auto",
    max_batch: int = 4,
    int8_source: str | None = None,
) -> EnginePlan:
    """Choose the ONNX and builder settings for `precision` and a 1..max_batch profile on `device`.

    INT8 on TensorRT >= 10 builds from the explicit Q/DQ ONNX (manifest onnx.int8, made by
    tools/engines/quantize.py); implicit calibration is deprecated there. On 8.x the default is the FP32 ONNX
    plus an entropy calibrator over real images (given to build_engine; a calibration cache next to
    the engine makes rebuilds skip it).
    """
    if max_batch < OPT_BATCH:
        raise UserError(f"inference.max_batch {max_batch}: an engine needs at least {OPT_BATCH}")
    built_as = engine_precision(precision)
    source: Int8Source | None = None
    if built_as in ("int8", "best"):
        wanted = int8_source or ("qdq" if major_version(device.tensorrt_version) >= 10 else "calibration")
        source = _INT8_SOURCES.get(wanted)
        if source is None:
            raise UserError(f"int8 source must be 'qdq' or 'calibration', not {wanted!r}")
    onnx_precision = Precision.int8 if source == "qdq" else Precision.fp32
    try:
        onnx_sha = manifest.verify_file(onnx_precision)
    except ManifestError as exc:
        if onnx_precision is Precision.int8:
            raise ManifestError(f"{exc}; make the Q/DQ ONNX with tools/engines/quantize.py first") from exc
        raise
    spec = BuildSpec(
        model=manifest.name,
        onnx_sha256=onnx_sha,
        precision=built_as,
        int8_source=source,
        input_name=manifest.input.name,
        input_shape=manifest.input.sample_shape,
        opt_batch=OPT_BATCH,
        max_batch=max_batch,
        workspace_mb=config.workspace_mb,
        dla_core=config.dla_core,
    )
    key = cache_key(spec, device)
    cache_dir = cache_dir_for(manifest, config)
    engine_path, sidecar_path = engine_paths(cache_dir, spec, key)
    calibration_cache = engine_path.with_suffix(".calib") if source == "calibration" else None
    return EnginePlan(
        onnx_path=manifest.onnx_path(onnx_precision),
        spec=spec,
        device=device,
        key=key,
        engine_path=engine_path,
        sidecar_path=sidecar_path,
        timing_cache=timing_cache_path(cache_dir, device),
        calibration_cache=calibration_cache,
    )


def calibration_id_for(files: list[Path]) -> str:
    """Identity of a calibration image set: its file names and contents, order-independent."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode("utf-8") + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _shape_text(batch: int, shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (batch, *shape))


def trtexec_command(plan: EnginePlan) -> list[str]:
    """The equivalent trtexec invocation (for a human reproducing or debugging a build)."""
    spec = plan.spec
    name = spec.input_name
    command = [
        "trtexec",
        f"--onnx={plan.onnx_path}",
        f"--saveEngine={plan.engine_path}",
        f"--minShapes={name}:{_shape_text(spec.min_batch, spec.input_shape)}",
        f"--optShapes={name}:{_shape_text(spec.opt_batch, spec.input_shape)}",
        f"--maxShapes={name}:{_shape_text(spec.max_batch, spec.input_shape)}",
        f"--memPoolSize=workspace:{spec.workspace_mb}",  # MiB when no unit is given (8.5+ and 10)
        f"--timingCacheFile={plan.timing_cache}",
    ]
    command += [f"--{flag.lower()}" for flag in plan.flags]
    if plan.calibration_cache is not None:
        command.append(f"--calib={plan.calibration_cache}")  # trtexec cannot calibrate; it reads our cache
    if spec.dla_core is not None:
        command += [f"--useDLACore={spec.dla_core}", "--allowGPUFallback"]
    return command
