"""The CUDA layer, in one place: device identity, context, stream, page-locked and device memory.

Today this wraps pycuda (the product's package list names it; JetPack ships it as python3-pycuda
or it builds from PyPI on the device). Everything else in the appliance talks to CudaDevice,
CudaStream and DeviceBuffer only, so moving to cuda-python means rewriting this file alone.
pycuda is imported inside functions so this module imports on machines without CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from appliance.errors import BackendUnavailable


def import_pycuda() -> ModuleType:
    """pycuda.driver, initialised; BackendUnavailable with the import error when absent."""
    try:
        import pycuda.driver as driver  # lazy: most machines have no CUDA
    except Exception as exc:  # ImportError, or OSError when libcuda is missing under the wheel
        raise BackendUnavailable(f"pycuda not importable: {exc}") from exc
    try:
        driver.init()
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError types
        raise BackendUnavailable(f"CUDA driver cannot start: {exc}") from exc
    return driver


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "major.minor"
    total_memory_mb: int


class DeviceBuffer:
    """Device memory allocated once; `ptr` is the raw address TensorRT wants."""

    def __init__(self, allocation: Any, nbytes: int) -> None:
        self._allocation = allocation
        self.nbytes = nbytes

    @property
    def ptr(self) -> int:
        return int(self._allocation)

    def free(self) -> None:
        if self._allocation is not None:
            self._allocation.free()
            self._allocation = None


class CudaStream:
    def __init__(self, driver: ModuleType) -> None:
        self._driver = driver
        self._stream = driver.Stream()

    @property
    def handle(self) -> int:
        return int(self._stream.handle)

    def upload(self, destination: DeviceBuffer, source: np.ndarray) -> None:
        self._driver.memcpy_htod_async(destination.ptr, source, self._stream)

    def download(self, destination: np.ndarray, source: DeviceBuffer) -> None:
        self._driver.memcpy_dtoh_async(destination, source.ptr, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()


class CudaDevice:
    """One GPU's primary context; TensorRT objects and buffers are used only while it is active."""

    def __init__(self, index: int = 0) -> None:
        self._driver = import_pycuda()
        try:
            self._device = self._driver.Device(index)
            # The primary context is the one the CUDA runtime (and so TensorRT) uses too.
            self._context = self._device.retain_primary_context()
        except Exception as exc:
            raise BackendUnavailable(f"CUDA device {index} not usable: {exc}") from exc

    def info(self) -> GpuInfo:
        major, minor = self._device.compute_capability()
        return GpuInfo(str(self._device.name()), f"{major}.{minor}", int(self._device.total_memory()) >> 20)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make the context current on this thread (the daemon may call from a worker thread)."""
        self._context.push()
        try:
            yield
        finally:
            self._driver.Context.pop()

    def stream(self) -> CudaStream:
        return CudaStream(self._driver)

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> np.ndarray:
        """Page-locked host array: async copies need it, and it is faster than pageable memory."""
        return self._driver.pagelocked_empty(shape, dtype)

    def allocate(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(self._driver.mem_alloc(max(1, nbytes)), nbytes)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing after a failed start must not mask the first error
            self._context.detach()


def gpu_info(index: int = 0) -> GpuInfo:
    """Name and compute capability of GPU `index`, without keeping a context."""
    device = CudaDevice(index)
    try:
        return device.info()
    finally:
        device.close()
