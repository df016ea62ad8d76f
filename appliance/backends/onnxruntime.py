"""ONNX Runtime backend: the embedded default that runs on every cart, CPU first."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from appliance.errors import BackendUnavailable
from appliance.manifest import Manifest, Precision

if TYPE_CHECKING:
    from appliance.backends.ort_lowering import LoweringReport

log = logging.getLogger(__name__)


class OnnxRuntimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="Execution providers in order of preference; unavailable ones are skipped with a warning.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description=(
            "Threads inside one operator; 0 = every core this process may use but one (at least one): the"
            " spare core reads the next image while the model runs."
        ),
    )
    inter_op_threads: int = Field(
        1, ge=1, description="Operators run in parallel; 1 because the graph is a chain."
    )
    graph_optimization: str = Field("all", pattern="^(disable|basic|extended|all)$")
    int8_cpu_lowering: bool = Field(
        True,
        description=(
            "INT8 only: rewrite the TensorRT-form Q/DQ model (symmetric INT8) in memory into the UINT8 form"
            " ONNX Runtime's CPU provider fuses (appliance.backends.ort_lowering); the file is not changed."
        ),
    )


class OnnxRuntimeBackendConfig(OnnxRuntimeConfig):
    """`inference.backend: {type: onnxruntime, ...}`: ONNX Runtime only."""

    type: Literal["onnxruntime"] = "onnxruntime"


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def intra_op_threads(configured: int) -> int:
    """The thread count ONNX Runtime gets: as configured, or for 0 all usable cores but one. ORT's own
    choice (one per core) makes its threads compete with the decoder for every core while a backlog
    waits, and its idle threads spin between runs, taking time from the thread reading the next image."""
    if configured:
        return configured
    return max(1, len(os.sched_getaffinity(0)) - 1)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, manifest: Manifest, precision: Precision, config: OnnxRuntimeConfig, max_batch: int = 4
    ):
        import onnxruntime as ort  # imported here so `doctor` can report a missing runtime plainly

        self.precision = precision.value
        self.model_sha256 = manifest.verify_file(precision)
        self.max_batch = max_batch
        self.fallback_reason: str | None = None
        self.input_name = manifest.input.name
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[config.graph_optimization]
        )
        options.intra_op_num_threads = intra_op_threads(config.intra_op_threads)
        options.inter_op_num_threads = config.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # The memory pattern pre-plans one block per batch shape; measured here it costs ~35 MB of peak
        # memory at batch 4 and saves no time (docs/performance.md).
        options.enable_mem_pattern = False
        available = set(ort.get_available_providers())
        providers = [p for p in config.providers if p in available]
        for missing in [p for p in config.providers if p not in available]:
            log.warning("ONNX Runtime provider %s is not available here; skipped", missing)
        if not providers:
            raise BackendUnavailable(f"none of the configured providers {config.providers} is available")
        path = manifest.onnx_path(precision)
        self.lowering: LoweringReport | None = None
        model: str | bytes = os.fspath(path)
        try:
            if (
                precision is Precision.int8
                and config.int8_cpu_lowering
                and providers[0] == "CPUExecutionProvider"
            ):
                from appliance.backends.ort_lowering import load_lowered  # onnx: only for INT8 here

                model, self.lowering = load_lowered(path)
                log.info(
                    "%s: INT8 lowered for the CPU in memory (%d ReLU Q/DQ to uint8, %d signed Q/DQ to uint8"
                    " zero point 128, %d pre-activation pairs removed)",
                    path.name,
                    self.lowering.relu_to_uint8,
                    self.lowering.signed_to_uint8,
                    self.lowering.pre_activation_pairs_removed,
                )
            self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for broken graphs
            raise BackendUnavailable(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        input_names = [i.name for i in self.session.get_inputs()]
        if self.input_name not in input_names:
            raise BackendUnavailable(f"{path}: has no input {self.input_name!r} (it has {input_names})")
        missing_outputs = {o.name for o in manifest.outputs} - set(self.output_names)
        if missing_outputs:
            raise BackendUnavailable(
                f"{path}: lacks outputs named in the manifest: {sorted(missing_outputs)}"
            )
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(
            self.output_names, {self.input_name: batch.astype(self.input_dtype, copy=False)}
        )
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }

    def close(self) -> None:
        del self.session
