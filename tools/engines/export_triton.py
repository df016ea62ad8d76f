#!/usr/bin/env python3
"""Write a Triton Inference Server model repository for a model manifest (the scale-out path).

    # the FP32 ONNX, served by Triton's ONNX Runtime backend on the server's GPU
    python -m tools.engines.export_triton --model engines/cxr-lite0/manifest.yaml --out /srv/triton-models
    # a TensorRT engine from the engine cache (built ON the server by tools/engines/build_engine.py)
    python -m tools.engines.export_triton --model engines/cxr-lite0 --out /srv/triton-models \\
        --plan engines/cxr-lite0/cache/cxr-lite0.fp16.<key>.engine

Layout written (Triton's own):  OUT/<model>/config.pbtxt
                                OUT/<model>/<version>/model.onnx   or   model.plan
                                OUT/<model>/<version>/manifest.yaml   (copy, for provenance)

config.pbtxt declares the inputs/outputs (names, types, dims without the batch axis, read from the
ONNX graph), max_batch_size, dynamic batching and the instance group, and records the provenance
in `parameters` (model_sha256 = the ONNX sha256, precision, onnx_precision, manifest name/version;
for a plan also the engine's sha256, GPU and TensorRT version). The appliance's `triton` backend
reads these back and refuses a served model that does not match its manifest.

Exit codes: 0 written, 2 user error (bad option, missing or changed file, unusable engine).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

from appliance.backends.triton import (
    PARAM_MODEL,
    PARAM_ONNX_PRECISION,
    PARAM_PRECISION,
    PARAM_SHA256,
    PARAM_VERSION,
)
from appliance.engine_cache import EngineMismatch, EngineRecord, read_record
from appliance.errors import ApplianceError, UserError
from appliance.manifest import Manifest, Precision, load_manifest, sha256_file

say = functools.partial(print, flush=True)

# ONNX element types Triton can declare; our models use FLOAT only, the rest keep the tool general.
TRITON_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorDecl:
    name: str
    data_type: str  # TYPE_FP32 ...
    dims: tuple[int, ...]  # without the batch axis; -1 = variable


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model manifest (YAML) or its folder")
    parser.add_argument("--out", required=True, help="model repository folder (created if missing)")
    parser.add_argument(
        "--precision", choices=[p.value for p in Precision], help="which ONNX of the manifest (default fp32)"
    )
    parser.add_argument(
        "--plan", help="serve this TensorRT engine from the engine cache (its sidecar is read)"
    )
    parser.add_argument(
        "--allow-unchecked-plan",
        action="store_true",
        help="accept an engine that has not passed tools/engines/check_parity.py yet (never one that failed)",
    )
    parser.add_argument("--name", help="model name in the repository (default: the manifest's name)")
    parser.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    parser.add_argument(
        "--max-batch", type=int, help="max_batch_size (default 8; a plan: its optimisation profile's max)"
    )
    parser.add_argument(
        "--preferred-batch",
        help="comma-separated preferred batch sizes for the dynamic batcher (default: powers of two up to max)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="how long the dynamic batcher waits to fill a batch (default 500 µs)",
    )
    parser.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    parser.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU"], default="KIND_GPU")
    parser.add_argument("--force", action="store_true", help="replace an existing version folder")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the ONNX graph


def _declared_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Each axis as its size, or its symbolic name ('' when unnamed)."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def _resolve_output_dims(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Output dims after shape inference, so e.g. a heatmap declared [batch, 'h', 'w'] becomes [batch, 64, 64].

    Exporters name non-batch axes they could not prove constant; with the input's fixed sample shape
    ONNX shape inference (with data propagation) often can. Unresolved axes stay symbolic (-1).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for output in probe.graph.output:
        for dim in list(output.type.tensor_type.shape.dim)[1:]:
            if not dim.HasField("dim_value"):
                dim.Clear()
    try:
        inferred = shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as exc:  # inference is an improvement only; the declared dims stay valid
        say(f"note: ONNX shape inference failed ({exc}); variable output axes stay -1")
        inferred = model
    declared = {o.name: _declared_dims(o) for o in model.graph.output}
    resolved = {o.name: _declared_dims(o) for o in inferred.graph.output}
    # Keep the declared batch axis (the probe cleared nothing there) and only take resolved sizes.
    merged: dict[str, list[int | str]] = {}
    for name, dims in declared.items():
        found = resolved.get(name, [])
        if len(found) != len(dims):  # inference dropped the shape: keep what the graph declares
            found = dims
        merged[name] = [
            dims[0],
            *[r if isinstance(r, int) and r > 0 else d for r, d in zip(found[1:], dims[1:], strict=True)],
        ]
    return merged


def _declaration(
    path: Path, value_name: str, elem_type: int, dims: list[int | str], batched: bool
) -> TensorDecl:
    data_type = TRITON_TYPES.get(elem_type)
    if data_type is None:
        raise UserError(
            f"{path}: tensor {value_name!r} has ONNX element type {elem_type}, which Triton cannot declare"
        )
    if batched:
        if not dims:
            raise UserError(f"{path}: tensor {value_name!r} is a scalar; it has no batch axis")
        if isinstance(dims[0], int) and dims[0] > 0:
            raise UserError(
                f"{path}: tensor {value_name!r} has a fixed batch axis of {dims[0]}; export the ONNX with a"
                " dynamic batch axis, or use --max-batch 0"
            )
        dims = dims[1:]
    return TensorDecl(value_name, data_type, tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims))


def graph_io(path: Path, batched: bool) -> tuple[list[TensorDecl], list[TensorDecl]]:
    """Inputs (initializers excluded) and outputs of the ONNX graph, dims without the batch axis."""
    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # protobuf DecodeError and friends: a damaged file
        raise UserError(f"{path}: cannot read the ONNX graph: {exc}") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [
        _declaration(path, v.name, v.type.tensor_type.elem_type, _declared_dims(v), batched)
        for v in model.graph.input
        if v.name not in initializers
    ]
    output_dims = _resolve_output_dims(model)
    outputs = [
        _declaration(path, v.name, v.type.tensor_type.elem_type, output_dims[v.name], batched)
        for v in model.graph.output
    ]
    return inputs, outputs


def check_against_manifest(
    path: Path, manifest: Manifest, inputs: list[TensorDecl], outputs: list[TensorDecl]
) -> None:
    names = [t.name for t in inputs]
    if names != [manifest.input.name]:
        raise UserError(f"{path}: inputs {names}, the manifest expects exactly [{manifest.input.name!r}]")
    want = manifest.input.sample_shape
    have = inputs[0].dims
    if len(have) != len(want) or any(h not in (w, -1) for h, w in zip(have, want, strict=False)):
        raise UserError(f"{path}: input {names[0]!r} has dims {list(have)}, the manifest says {list(want)}")
    missing = [o.name for o in manifest.outputs if o.name not in {t.name for t in outputs}]
    if missing:
        raise UserError(f"{path}: lacks outputs named in the manifest: {missing}")


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


# --------------------------------------------------------------------------- writing


def _copy_verified(source: Path, target: Path, sha256: str) -> None:
    shutil.copyfile(source, target)
    if sha256_file(target) != sha256:
        raise UserError(
            f"{target}: the copy does not match {source}'s sha256 (disk or file changed during copy)"
        )


def write_repository(plan: RepositoryPlan, manifest: Manifest, out: Path, force: bool) -> Path:
    """Write OUT/<name>/<version>/ and OUT/<name>/config.pbtxt; nothing half-written on failure."""
    model_dir = out / plan.name
    version_dir = model_dir / str(plan.version)
    if version_dir.exists() and not force:
        raise UserError(f"{version_dir}: already exists; give --force to replace it or --version N")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{model_dir}: cannot create: {exc.strerror}") from exc
    # Build the version folder beside its final place, then swap it in: Triton polling the
    # repository never sees a version without its model file.
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{plan.version}.", suffix=".tmp"))
    try:
        say(f"copying {plan.source} -> {version_dir / plan.model_file}")
        _copy_verified(plan.source, staging / plan.model_file, plan.source_sha256)
        shutil.copyfile(manifest.folder / "manifest.yaml", staging / "manifest.yaml")
        if version_dir.exists():
            shutil.rmtree(version_dir)
        staging.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
        os.replace(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    config_path = model_dir / "config.pbtxt"
    temporary = config_path.with_name(".config.pbtxt.tmp")
    temporary.write_text(render_config(plan), encoding="utf-8")
    os.replace(temporary, config_path)
    return config_path


def export(args: argparse.Namespace) -> int:
    manifest = load_manifest(Path(args.model))
    say(f"model       {manifest.name} {manifest.version} ({manifest.folder})")
    plan = plan_repository(args, manifest)
    say(
        f"serving     {plan.platform} ({plan.parameters[PARAM_PRECISION]}), sha256 {plan.parameters[PARAM_SHA256][:12]}…"
    )
    say(
        f"batching    max {plan.max_batch}, preferred {plan.preferred_batch}, queue delay {plan.queue_delay_us} µs"
    )
    say(f"instances   {plan.instances} x {plan.kind}")
    for tensor in plan.inputs + plan.outputs:
        say(f"tensor      {tensor.name}: {tensor.data_type} {list(tensor.dims)}")
    config_path = write_repository(plan, manifest, Path(args.out), args.force)
    say(f"wrote       {config_path}")
    if plan.platform == "tensorrt_plan":
        say(
            f"note: the engine runs only on {plan.parameters['gpu_name']} (sm {plan.parameters['compute_capability']})"
            f" with TensorRT {plan.parameters['tensorrt_version']}: the Triton server must match"
        )
    say(f"serve with  tritonserver --model-repository {Path(args.out).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return export(args)
    except ApplianceError as exc:  # UserError, ManifestError: a plain message
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
