"""TensorRT backend for Jetson carts: plan, build and run serialized engines.

Written to the TensorRT 10 Python API (JetPack 6); TensorRT 8.5/8.6 (JetPack 5) works through the
same named-tensor calls, and older 8.x through the bindings API. TensorRT and pycuda are imported
inside functions, so this module imports everywhere and `doctor` can say plainly what is missing.

The steps are small and callable on their own (Polygraphy style): plan_engine (pure: which ONNX,
which flags, which cache key), trtexec_command (the same plan as a command line), build_engine
(ONNX -> serialized engine + sidecar) and TensorRTBackend (engine -> outputs).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from appliance.backends.cuda import CudaDevice, DeviceBuffer, gpu_info
from appliance.engine_cache import (
    BuildSpec,
    DeviceIdentity,
    EngineRecord,
    cache_key,
    engine_paths,
    read_l4t_release,
    store_engine,
    timing_cache_path,
)
from appliance.errors import BackendUnavailable, ManifestError, UserError
from appliance.manifest import Manifest, Precision

Progress = Callable[[str], None]


class TensorRTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: str = Field(
        "fp16", pattern="^(fp16|int8|best)$", description="Engine precision on the device."
    )
    engine_cache: Path | None = Field(None, description="Folder for engines; default engines/<model>/cache.")
    workspace_mb: int = Field(1024, ge=64)
    opt_batch: int = Field(1, ge=1)
    max_batch: int = Field(4, ge=1)
    dla_core: int | None = Field(None, ge=0, description="Jetson DLA core, if the module has one.")
    build_if_missing: bool = Field(False, description="Build a missing engine at start (takes minutes).")
    require_parity: bool = Field(
        True, description="Load only engines whose sidecar records a passed tools/check_parity.py run."
    )
    device_index: int = Field(0, ge=0, description="CUDA device (always 0 on a Jetson).")


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
    )


def cache_dir_for(manifest: Manifest, config: TensorRTConfig) -> Path:
    return config.engine_cache if config.engine_cache is not None else manifest.folder / "cache"


@dataclass(frozen=True)
class EnginePlan:
    """What to build and where, decided without TensorRT (so --dry-run can show it anywhere)."""

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
        return {"fp16": ["FP16"], "int8": ["INT8"], "best": ["FP16", "INT8"]}[self.spec.precision]


def sample_shape(manifest: Manifest) -> tuple[int, ...]:
    spec = manifest.input
    if spec.layout == "NCHW":
        return (spec.channels, spec.height, spec.width)
    return (spec.height, spec.width, spec.channels)


def plan_engine(
    manifest: Manifest,
    config: TensorRTConfig,
    device: DeviceIdentity,
    int8_source: str | None = None,
) -> EnginePlan:
    """Choose the ONNX and builder settings for `config.precision` on `device`.

    INT8 on TensorRT >= 10 builds from the explicit Q/DQ ONNX (manifest onnx.int8, made by
    tools/quantize.py); implicit calibration is deprecated there. On 8.x the default is the FP32 ONNX
    plus an entropy calibrator over real images (given to build_engine; a calibration cache next to
    the engine makes rebuilds skip it).
    """
    if config.opt_batch > config.max_batch:
        raise UserError(
            f"tensorrt.opt_batch {config.opt_batch} is larger than tensorrt.max_batch {config.max_batch}"
        )
    precision = config.precision
    source: str | None = None
    if precision in ("int8", "best"):
        source = int8_source or ("qdq" if major_version(device.tensorrt_version) >= 10 else "calibration")
        if source not in ("qdq", "calibration"):
            raise UserError(f"int8 source must be 'qdq' or 'calibration', not {source!r}")
    onnx_precision = Precision.int8 if source == "qdq" else Precision.fp32
    try:
        onnx_sha = manifest.verify_file(onnx_precision)
    except ManifestError as exc:
        if onnx_precision is Precision.int8:
            raise ManifestError(f"{exc}; make the Q/DQ ONNX with tools/quantize.py first") from exc
        raise
    spec = BuildSpec(
        model=manifest.name,
        onnx_sha256=onnx_sha,
        precision=precision,
        int8_source=source,
        input_name=manifest.input.name,
        input_shape=sample_shape(manifest),
        opt_batch=config.opt_batch,
        max_batch=config.max_batch,
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
    command += {"fp16": ["--fp16"], "int8": ["--int8"], "best": ["--fp16", "--int8"]}[spec.precision]
    if plan.calibration_cache is not None:
        command.append(f"--calib={plan.calibration_cache}")  # trtexec cannot calibrate; it reads our cache
    if spec.dla_core is not None:
        command += [f"--useDLACore={spec.dla_core}", "--allowGPUFallback"]
    return command


# --------------------------------------------------------------------------- build


class BuildFailed(UserError):
    """TensorRT could not parse or build the network; the message carries TensorRT's own errors."""


@contextlib.contextmanager
def _heartbeat(progress: Progress, label: str, every_s: float = 15.0) -> Iterator[None]:
    """Say every few seconds that a long step is still running (a Jetson build takes minutes)."""
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            progress(f"{label}: still running, {time.monotonic() - started:.0f} s")

    thread = threading.Thread(target=beat, name="trt-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        progress(f"{label}: done in {time.monotonic() - started:.1f} s")


def _network_flags(trt: ModuleType) -> int:
    # TensorRT 10 networks are always explicit-batch (the flag is gone); 8.x must ask for it.
    if major_version(str(trt.__version__)) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse_onnx(trt: ModuleType, builder: Any, logger: Any, plan: EnginePlan) -> tuple[Any, Any]:
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files next to the ONNX, parse(bytes) would not.
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailed(
            f"{plan.onnx_path}: TensorRT's ONNX parser refused it: {'; '.join(errors) or 'no detail'}"
        )
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [tensor.name for tensor in inputs]
    if names != [plan.spec.input_name]:
        raise BuildFailed(
            f"{plan.onnx_path}: inputs {names}, the manifest expects exactly [{plan.spec.input_name!r}]"
        )
    batch_dim = inputs[0].shape[0]
    if batch_dim != -1 and batch_dim < plan.spec.max_batch:
        raise BuildFailed(
            f"{plan.onnx_path}: fixed batch {batch_dim} < max_batch {plan.spec.max_batch};"
            " export the ONNX with a dynamic batch axis"
        )
    # Parser and network must outlive the build (the network references parser-owned weights).
    return network, parser


def _builder_config(trt: ModuleType, builder: Any, plan: EnginePlan, progress: Progress) -> tuple[Any, Any]:
    spec = plan.spec
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    shape = spec.input_shape
    profile.set_shape(
        spec.input_name, (spec.min_batch, *shape), (spec.opt_batch, *shape), (spec.max_batch, *shape)
    )
    config.add_optimization_profile(profile)
    if spec.dla_core is not None:
        if builder.num_DLA_cores <= spec.dla_core:
            raise UserError(
                f"tensorrt.dla_core {spec.dla_core}: this module has {builder.num_DLA_cores} DLA core(s)"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = spec.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
    serialized_cache = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    if serialized_cache:
        progress(f"timing cache: reusing {plan.timing_cache} ({len(serialized_cache) >> 10} KiB)")
    timing_cache = config.create_timing_cache(serialized_cache)
    config.set_timing_cache(timing_cache, False)  # False: refuse a cache from another device/version
    return config, timing_cache


def _entropy_calibrator(
    trt: ModuleType, cuda: CudaDevice, plan: EnginePlan, batch_size: int, batches: Iterable[np.ndarray]
) -> Any:
    """TensorRT 8.x implicit INT8: an IInt8EntropyCalibrator2 feeding real preprocessed images.

    Defined here because it must subclass a TensorRT class, which exists only once TensorRT is imported.
    """
    assert plan.calibration_cache is not None
    cache_path = plan.calibration_cache

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._buffer: DeviceBuffer | None = None
            self._host: np.ndarray | None = None
            self.seen = 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if self._buffer is None:
                self._buffer = cuda.allocate(batch.nbytes)
                self._host = cuda.pinned(batch.shape, np.float32)
            assert self._host is not None
            np.copyto(self._host, batch)
            stream = cuda.stream()
            stream.upload(self._buffer, self._host)
            stream.synchronize()
            self.seen += batch.shape[0]
            return [self._buffer.ptr]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(
    plan: EnginePlan,
    progress: Progress = print,
    calibration_batches: Iterable[np.ndarray] | None = None,
    calibration_batch_size: int = 8,
    calibration_id: str | None = None,
) -> EngineRecord:
    """ONNX -> serialized engine + sidecar in the cache, updating the persistent timing cache."""
    trt = import_tensorrt()
    if (
        plan.calibration_cache is not None
        and calibration_batches is None
        and not plan.calibration_cache.is_file()
    ):
        raise UserError(
            f"INT8 on TensorRT {plan.device.tensorrt_version} calibrates on real images and no calibration"
            f" cache {plan.calibration_cache} exists: give --calibration-images DIR, or use the Q/DQ ONNX"
            " (--int8-source qdq)"
        )
    cuda = CudaDevice()
    started = time.monotonic()
    try:
        with cuda.active():
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            progress(f"parsing {plan.onnx_path}")
            network, _parser = _parse_onnx(trt, builder, logger, plan)
            config, _timing = _builder_config(trt, builder, plan, progress)
            calibrator = None
            if plan.calibration_cache is not None:
                calibrator = _entropy_calibrator(
                    trt, cuda, plan, calibration_batch_size, calibration_batches or ()
                )
                config.int8_calibrator = calibrator
                shape = (calibration_batch_size, *plan.spec.input_shape)
                calibration_profile = builder.create_optimization_profile()
                calibration_profile.set_shape(plan.spec.input_name, shape, shape, shape)
                config.set_calibration_profile(calibration_profile)
            progress(
                f"building {plan.spec.precision} engine ({', '.join(plan.flags)}); this takes minutes on a Jetson"
            )
            with _heartbeat(progress, "build"):
                serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise BuildFailed(
                    f"{plan.onnx_path}: TensorRT could not build the engine (see its log lines above)"
                )
            if calibrator is not None:
                progress(f"calibrated on {calibrator.seen} images; cache {plan.calibration_cache}")
            plan.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            plan.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    finally:
        cuda.close()
    elapsed = time.monotonic() - started
    record = store_engine(
        plan.engine_path.parent, plan.spec, plan.device, bytes(serialized), elapsed, calibration_id
    )
    progress(
        f"engine {plan.engine_path} ({plan.engine_path.stat().st_size >> 20} MiB), sidecar {plan.sidecar_path}"
    )
    return record


# --------------------------------------------------------------------------- run


@dataclass
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype[Any]
    host: np.ndarray  # page-locked, shaped for max batch
    device: DeviceBuffer


class _NamedTensorIo:
    """TensorRT >= 8.5: tensors by name, execute_async_v3."""

    def __init__(self, trt: ModuleType, engine: Any, context: Any) -> None:
        self.trt, self.engine, self.context = trt, engine, context

    def tensors(self) -> list[tuple[str, bool, np.dtype[Any]]]:
        found = []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            is_input = self.engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            found.append((name, is_input, np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))))
        return found

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise BackendUnavailable(f"TensorRT refused input shape {shape} for {name}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))

    def bind(self, tensors: list[_Tensor]) -> None:
        for tensor in tensors:  # buffers never move, so addresses are set once
            self.context.set_tensor_address(tensor.name, tensor.device.ptr)

    def execute(self, stream_handle: int) -> bool:
        return bool(self.context.execute_async_v3(stream_handle))


class _BindingsIo:
    """TensorRT < 8.5: binding indices, execute_async_v2."""

    def __init__(self, trt: ModuleType, engine: Any, context: Any) -> None:
        self.trt, self.engine, self.context = trt, engine, context
        self.addresses: list[int] = [0] * engine.num_bindings

    def tensors(self) -> list[tuple[str, bool, np.dtype[Any]]]:
        return [
            (
                self.engine.get_binding_name(i),
                bool(self.engine.binding_is_input(i)),
                np.dtype(self.trt.nptype(self.engine.get_binding_dtype(i))),
            )
            for i in range(self.engine.num_bindings)
        ]

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_binding_shape(self.engine.get_binding_index(name), shape):
            raise BackendUnavailable(f"TensorRT refused input shape {shape} for {name}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_binding_shape(self.engine.get_binding_index(name)))

    def bind(self, tensors: list[_Tensor]) -> None:
        for tensor in tensors:
            self.addresses[self.engine.get_binding_index(tensor.name)] = tensor.device.ptr

    def execute(self, stream_handle: int) -> bool:
        return bool(self.context.execute_async_v2(bindings=self.addresses, stream_handle=stream_handle))


class TensorRTBackend:
    """Runs a verified engine: buffers for max batch allocated once, one stream, pinned host memory."""

    name = "tensorrt"

    def __init__(
        self, manifest: Manifest, engine_path: Path, record: EngineRecord, device_index: int = 0
    ) -> None:
        trt = import_tensorrt()
        self.precision: str = record.spec.precision
        self.model_sha256 = record.spec.onnx_sha256
        self.max_batch = record.spec.max_batch
        self.fallback_reason: str | None = None
        self.input_name = manifest.input.name
        self.engine_path = engine_path
        self._cuda = CudaDevice(device_index)
        try:
            with self._cuda.active():
                self._setup(trt, manifest, engine_path)
        except BaseException:
            self._cuda.close()
            raise

    def _setup(self, trt: ModuleType, manifest: Manifest, engine_path: Path) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BackendUnavailable(
                f"{engine_path}: TensorRT cannot deserialize it (built by another version?)"
            )
        self._context = self._engine.create_execution_context()
        io_class = _NamedTensorIo if hasattr(self._engine, "num_io_tensors") else _BindingsIo
        self._io: _NamedTensorIo | _BindingsIo = io_class(trt, self._engine, self._context)
        described = self._io.tensors()
        inputs = [name for name, is_input, _ in described if is_input]
        if inputs != [self.input_name]:
            raise BackendUnavailable(
                f"{engine_path}: inputs {inputs}, the manifest expects [{self.input_name!r}]"
            )
        missing = {o.name for o in manifest.outputs} - {
            name for name, is_input, _ in described if not is_input
        }
        if missing:
            raise BackendUnavailable(f"{engine_path}: lacks outputs named in the manifest: {sorted(missing)}")
        self._sample_shape = sample_shape(manifest)
        # Resolve every output's shape at max batch, then size all buffers for it once.
        self._io.set_input_shape(self.input_name, (self.max_batch, *self._sample_shape))
        self._tensors: list[_Tensor] = []
        for name, is_input, dtype in described:
            shape = self._io.shape(name)
            if any(d < 0 for d in shape):
                raise BackendUnavailable(f"{engine_path}: output {name} has unresolved shape {shape}")
            host = self._cuda.pinned(shape, dtype)
            self._tensors.append(_Tensor(name, is_input, dtype, host, self._cuda.allocate(host.nbytes)))
        self._io.bind(self._tensors)
        self._stream = self._cuda.stream()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.shape[1:] != self._sample_shape:
            raise ValueError(
                f"batch shape {batch.shape} does not match the engine's sample {self._sample_shape}"
            )
        parts = [
            self._run_chunk(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        count = chunk.shape[0]
        with self._cuda.active():
            self._io.set_input_shape(self.input_name, (count, *self._sample_shape))
            for tensor in self._tensors:
                if tensor.is_input:
                    np.copyto(tensor.host[:count], chunk, casting="same_kind")
                    self._stream.upload(tensor.device, tensor.host[:count])
            if not self._io.execute(self._stream.handle):
                raise BackendUnavailable(f"{self.engine_path}: TensorRT execution failed")
            outputs = [t for t in self._tensors if not t.is_input]
            shapes = {t.name: self._io.shape(t.name) for t in outputs}
            for tensor in outputs:
                # Copy only what this batch produced: a view of the first count rows is contiguous.
                view = tensor.host.reshape(-1)[: int(np.prod(shapes[tensor.name]))]
                self._stream.download(view, tensor.device)
            self._stream.synchronize()
        return {
            t.name: t.host.reshape(-1)[: int(np.prod(shapes[t.name]))]
            .reshape(shapes[t.name])
            .astype(np.float32)
            for t in outputs
        }

    def close(self) -> None:
        with self._cuda.active():
            for tensor in self._tensors:
                tensor.device.free()
            del self._context, self._engine, self._runtime
        self._cuda.close()
