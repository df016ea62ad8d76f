"""The tensors a Triton model repository declares, read from the ONNX graph (tools/engines/export_triton.py):
names, Triton data types and dims without the batch axis, outputs' variable axes resolved by shape
inference where it can, and checked against the model manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

from appliance.errors import UserError
from appliance.manifest import Manifest

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
        print(f"note: ONNX shape inference failed ({exc}); variable output axes stay -1", flush=True)
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
