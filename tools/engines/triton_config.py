"""What a Triton model repository's config.pbtxt says (tools/engines/export_triton.py): the plan, decided
from the options, the manifest and the ONNX graph or the TensorRT engine's sidecar before anything is
written, and its text in protobuf text format."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from appliance.backends.triton import (
    PARAM_MODEL,
    PARAM_ONNX_PRECISION,
    PARAM_PRECISION,
    PARAM_SHA256,
    PARAM_VERSION,
)
from appliance.engine_cache import EngineMismatch, EngineRecord, read_record
from appliance.errors import UserError
from appliance.manifest import Manifest, Precision, sha256_file
from tools.engines.triton_graph import TensorDecl, check_against_manifest, graph_io


@dataclass(frozen=True)
class RepositoryPlan:
    """Everything config.pbtxt says, decided before anything is written."""

    name: str
    version: int
    platform: str  # onnxruntime_onnx | tensorrt_plan
    model_file: str  # model.onnx | model.plan
    source: Path  # the file copied as model_file
    source_sha256: str
    max_batch: int
    inputs: list[TensorDecl]
    outputs: list[TensorDecl]
    preferred_batch: list[int]
    queue_delay_us: int
    instances: int
    kind: str
    parameters: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the plan


def preferred_sizes(text: str | None, max_batch: int) -> list[int]:
    if max_batch == 0:
        return []
    if text is None:
        sizes, size = [], 2
        while size <= max_batch:
            sizes.append(size)
            size *= 2
        return sizes or [max_batch]
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--preferred-batch {text!r}: give comma-separated integers, e.g. 4,8") from None
    bad = [s for s in sizes if not 1 <= s <= max_batch]
    if bad or not sizes:
        raise UserError(f"--preferred-batch {text!r}: sizes must lie in 1..{max_batch} (--max-batch)")
    return sizes


def engine_record(plan_path: Path) -> EngineRecord:
    """The engine's sidecar, with the engine verified against it."""
    if not plan_path.is_file():
        raise UserError(f"{plan_path}: TensorRT engine not found")
    try:
        record = read_record(plan_path.with_suffix(".json"))
    except EngineMismatch as exc:
        raise UserError(
            f"{exc} (an engine is exported with the sidecar tools/engines/build_engine.py wrote)"
        ) from exc
    if record.engine_file != plan_path.name:
        raise UserError(f"{plan_path}: its sidecar describes another engine ({record.engine_file})")
    if sha256_file(plan_path) != record.engine_sha256:
        raise UserError(f"{plan_path}: sha256 does not match its sidecar (damaged engine)")
    return record


def plan_repository(args: argparse.Namespace, manifest: Manifest) -> RepositoryPlan:
    for option, value, low in (("--version", args.version, 1), ("--instances", args.instances, 1)):
        if value < low:
            raise UserError(f"{option} must be >= {low}, not {value}")
    if args.max_queue_delay_us < 0:
        raise UserError("--max-queue-delay-us must be >= 0")
    parameters = {PARAM_MODEL: manifest.name, PARAM_VERSION: manifest.version}
    if args.plan:
        if args.precision:
            raise UserError("--precision picks an ONNX; a --plan has the precision it was built with")
        if args.kind != "KIND_GPU":
            raise UserError("a TensorRT plan runs on a GPU only: --kind KIND_GPU")
        source = Path(args.plan)
        record = engine_record(source)
        if record.parity is not None and not record.parity.passed:
            raise UserError(
                f"{source}: the engine FAILED the parity check ({record.parity.report}); not exported"
            )
        if record.parity is None and not args.allow_unchecked_plan:
            raise UserError(
                f"{source}: the engine has not passed tools/engines/check_parity.py yet; run it on the server"
                " (--record), or give --allow-unchecked-plan"
            )
        onnx_precision = Precision.int8 if record.spec.int8_source == "qdq" else Precision.fp32
        onnx_sha = manifest.verify_file(onnx_precision)
        if record.spec.onnx_sha256 != onnx_sha:
            raise UserError(
                f"{source}: built from ONNX {record.spec.onnx_sha256[:12]}…, but manifest {manifest.name}"
                f" lists {onnx_sha[:12]}… for {onnx_precision.value}: rebuild it with tools/engines/build_engine.py"
            )
        max_batch = record.spec.max_batch if args.max_batch is None else args.max_batch
        if not 1 <= max_batch <= record.spec.max_batch:
            raise UserError(
                f"--max-batch {max_batch}: the engine's optimisation profile allows 1..{record.spec.max_batch}"
            )
        platform, model_file, precision = "tensorrt_plan", "model.plan", str(record.spec.precision)
        source_sha = record.engine_sha256
        device = record.device
        parameters |= {
            "engine_sha256": record.engine_sha256,
            "gpu_name": device.gpu_name,
            "compute_capability": device.compute_capability,
            "tensorrt_version": device.tensorrt_version,
        }
    else:
        onnx_precision = Precision(args.precision or "fp32")
        source = manifest.onnx_path(onnx_precision)
        onnx_sha = manifest.verify_file(onnx_precision)
        max_batch = 8 if args.max_batch is None else args.max_batch
        if max_batch < 0:
            raise UserError(f"--max-batch must be >= 0, not {max_batch}")
        platform, model_file, precision, source_sha = (
            "onnxruntime_onnx",
            "model.onnx",
            onnx_precision.value,
            onnx_sha,
        )
    parameters |= {
        PARAM_SHA256: onnx_sha,
        PARAM_PRECISION: precision,
        PARAM_ONNX_PRECISION: onnx_precision.value,
    }
    graph = manifest.onnx_path(onnx_precision)
    inputs, outputs = graph_io(graph, batched=max_batch > 0)
    check_against_manifest(graph, manifest, inputs, outputs)
    name = args.name or manifest.name
    if not name or "/" in name or name.startswith("."):
        raise UserError(f"--name {name!r}: a model name must be a plain folder name")
    return RepositoryPlan(
        name=name,
        version=args.version,
        platform=platform,
        model_file=model_file,
        source=source,
        source_sha256=source_sha,
        max_batch=max_batch,
        inputs=inputs,
        outputs=outputs,
        preferred_batch=preferred_sizes(args.preferred_batch, max_batch),
        queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        kind=args.kind,
        parameters=parameters,
    )


# --------------------------------------------------------------------------- config.pbtxt


def _quote(text: str) -> str:
    # Protobuf text format strings: C-style escapes; UTF-8 passes through.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensors(key: str, tensors: list[TensorDecl]) -> list[str]:
    lines = [f"{key} ["]
    for index, tensor in enumerate(tensors):
        dims = ", ".join(str(d) for d in tensor.dims)
        lines += [
            "  {",
            f"    name: {_quote(tensor.name)}",
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if index < len(tensors) - 1 else ""),
        ]
    return [*lines, "]"]


def render_config(plan: RepositoryPlan) -> str:
    lines = [
        "# Written by tools/engines/export_triton.py; provenance in `parameters` (read back by the appliance).",
        f"name: {_quote(plan.name)}",
        f"platform: {_quote(plan.platform)}",
        f"max_batch_size: {plan.max_batch}",
        f"default_model_filename: {_quote(plan.model_file)}",
        *_tensors("input", plan.inputs),
        *_tensors("output", plan.outputs),
    ]
    if plan.max_batch > 0:
        sizes = ", ".join(str(s) for s in plan.preferred_batch)
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: [ {sizes} ]",
            f"  max_queue_delay_microseconds: {plan.queue_delay_us}",
            "}",
        ]
    lines += ["instance_group [", "  {", f"    count: {plan.instances}", f"    kind: {plan.kind}", "  }", "]"]
    for key, value in plan.parameters.items():
        lines += [
            "parameters {",
            f"  key: {_quote(key)}",
            f"  value {{ string_value: {_quote(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"
