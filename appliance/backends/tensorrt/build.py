"""ONNX -> network -> serialized engine + sidecar in the cache (the build loader).

_parse_onnx makes the network, _builder_config the builder settings (flags, the optimisation profile
from the plan, the persistent timing cache), build_engine runs the builder and stores the result
through appliance.engine_cache. TensorRT is imported when a build starts, never at import.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from appliance.backends.cuda import CudaDevice, DeviceBuffer
from appliance.backends.tensorrt.plan import EnginePlan, import_tensorrt, major_version
from appliance.durable import write_atomically
from appliance.engine_cache import EngineRecord, store_engine
from appliance.errors import UserError

Progress = Callable[[str], None]


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
    spec = plan.spec
    batch_dim, *sample = (int(d) for d in inputs[0].shape)
    # The profile gives the batch axis min..max and the rest the manifest's shape; TensorRT's set_shape
    # raises (ValueError, not a build failure) where a fixed dimension disagrees.
    if batch_dim != -1 and not batch_dim == spec.min_batch == spec.max_batch:
        raise BuildFailed(
            f"{plan.onnx_path}: fixed batch {batch_dim}, the engine is for {spec.min_batch}..{spec.max_batch}"
            " images; export the ONNX with a dynamic batch axis"
        )
    if len(sample) != len(spec.input_shape) or any(
        d not in (-1, want) for d, want in zip(sample, spec.input_shape, strict=True)
    ):
        raise BuildFailed(
            f"{plan.onnx_path}: input {tuple(sample)} per image, the manifest says {spec.input_shape}"
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
    # False: refuse a cache made on another device or TensorRT (set_timing_cache says so by its answer).
    if not config.set_timing_cache(timing_cache, False):
        progress(f"timing cache {plan.timing_cache} was made elsewhere; starting a new one")
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)
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
            write_atomically(cache_path, bytes(cache))  # a cache cut short would calibrate the next build

    return EntropyCalibrator()


def _calibration_id_path(cache: Path) -> Path:
    return cache.with_name(f"{cache.name}.id")


def stored_calibration_id(cache: Path) -> str | None:
    """The id of the images a calibration cache was made from (kept beside it), None when unknown: an
    engine rebuilt from the cache records the same id as the one first calibrated."""
    try:
        return _calibration_id_path(cache).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):  # missing or unreadable: the engine records none
        return None


def store_calibration_id(cache: Path, calibration_id: str) -> None:
    write_atomically(_calibration_id_path(cache), f"{calibration_id}\n".encode())


def build_engine(
    plan: EnginePlan,
    progress: Progress = print,
    calibration_batches: Iterable[np.ndarray] | None = None,
    calibration_batch_size: int = 8,
    calibration_id: str | None = None,
    device_index: int = 0,
) -> EngineRecord:
    """ONNX -> serialized engine + sidecar in the cache, updating the persistent timing cache.
    `device_index`: the GPU the plan's device identity was read from (tensorrt.device_index)."""
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
    calibration_cache = plan.calibration_cache
    calibrating = calibration_cache is not None and not calibration_cache.is_file()
    if calibration_cache is not None:
        if calibrating:  # an id left from a deleted cache is not this one's
            _calibration_id_path(calibration_cache).unlink(missing_ok=True)
        elif calibration_id is None:  # rebuilt from the cache: the images it was made from
            calibration_id = stored_calibration_id(calibration_cache)
    cuda = CudaDevice(device_index)
    started = time.monotonic()
    try:
        with cuda.active():
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            progress(f"parsing {plan.onnx_path}")
            network, _parser = _parse_onnx(trt, builder, logger, plan)
            config, timing_cache = _builder_config(trt, builder, plan, progress)
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
                if calibrating and calibration_id is not None and calibration_cache is not None:
                    store_calibration_id(calibration_cache, calibration_id)
            plan.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            # Whole or not at all: a cache cut short by a power cut would be fed to the next build.
            write_atomically(plan.timing_cache, bytes(timing_cache.serialize()))
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
