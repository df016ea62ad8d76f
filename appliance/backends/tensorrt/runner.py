"""Engine -> outputs (the runner): execution context, bindings, one CUDA stream via appliance.backends.cuda.

Buffers for the engine's max batch are allocated once in page-locked host and device memory; a
batch larger than max batch is split into chunks (the batch contract in base.py).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from appliance.backends.cuda import CudaDevice, DeviceBuffer
from appliance.backends.tensorrt.plan import import_tensorrt
from appliance.engine_cache import EngineRecord
from appliance.errors import BackendUnavailable
from appliance.manifest import Manifest


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
        if self._context is None:  # TensorRT answers None, not an exception, e.g. when GPU memory is short
            raise BackendUnavailable(f"{engine_path}: TensorRT could not create an execution context")
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
        self._sample_shape = manifest.input.sample_shape
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
        """Free the buffers, the stream and the TensorRT objects inside the context they belong to, then
        release the context (a SIGHUP reload closes one runner and opens another). Idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        with self._cuda.active():
            for tensor in self._tensors:
                tensor.device.free()
            # The tensor records hold pinned host arrays, the I/O helper the engine and context: all go
            # while the context is current, or pycuda frees them against a dead one.
            self._tensors = []
            del self._io, self._context, self._engine, self._runtime, self._stream
            gc.collect()
        self._cuda.close()
