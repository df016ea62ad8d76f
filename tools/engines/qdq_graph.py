"""The INT8 graph's Q/DQ surgery and checks (tools/engines/quantize_int8.py builds the graph with them).

Which nodes stay float (everything outside the backbone, and its leading blocks), the post-activation
scale for the Q in front of each ReLU6, dropping Q/DQ pairs that only feed float nodes, and the check
that the result is what TensorRT 10 explicit quantisation accepts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

BACKBONE_PREFIXES = ("/model/_conv_stem", "/model/_blocks", "/model/_conv_head")


def backbone_units(model: onnx.ModelProto) -> list[str]:
    """The stem, each block and the head conv, in graph order (name prefixes)."""
    units: list[str] = []
    for node in model.graph.node:
        if node.name.startswith("/model/_blocks."):
            prefix = "/".join(node.name.split("/")[:3]) + "/"
        elif node.name.startswith(BACKBONE_PREFIXES):
            prefix = "/".join(node.name.split("/")[:3])
        else:
            continue
        if prefix not in units:
            units.append(prefix)
    return units


def float_nodes(model: onnx.ModelProto, float_blocks: int) -> list[str]:
    """Nodes to keep float: everything outside the backbone, plus the stem and the first `float_blocks`
    blocks (0: the whole backbone is quantised). A Clip/Relu reading a unit's output belongs to that unit
    (ReLU6 is the unit's activation, quantised with it)."""
    units = backbone_units(model)
    float_units = set(units[: float_blocks + 1]) if float_blocks > 0 else set()
    names = {n.name for n in model.graph.node}

    def unit_of(name: str) -> str | None:
        return next((u for u in units if name.startswith(u)), None)

    producer = {o: n for n in model.graph.node for o in n.output}
    owner: dict[str, str | None] = {}
    for node in model.graph.node:
        unit = unit_of(node.name)
        if unit is None and node.op_type in ("Clip", "Relu") and node.input[0] in producer:
            unit = unit_of(producer[node.input[0]].name)
        owner[node.name] = unit
    return sorted(n for n in names if owner[n] is None or owner[n] in float_units)


def activation_scales_follow_clip(model: onnx.ModelProto) -> int:
    """Conv -> Q -> DQ -> Clip(0, 6) -> Q: give the first Q the scale of the second.

    The quantiser calibrates the conv output before the activation: the stem's spans about ±80 (frozen
    ImageNet BatchNorm statistics) while ReLU6 keeps [0, 6], so one per-tensor step of 0.65 would erase the
    stem's signal. With the post-activation scale the Q saturates at the activation's range, which the
    Clip that follows makes exact: the same as quantising after the activation (TensorRT's placement)."""
    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    changed = 0
    for clip in (n for n in model.graph.node if n.op_type in ("Clip", "Relu")):
        dq_a = producer.get(clip.input[0])
        after = consumers.get(clip.output[0], [])
        if dq_a is None or dq_a.op_type != "DequantizeLinear" or not after:
            continue
        if not all(n.op_type == "QuantizeLinear" for n in after):
            continue
        q_a = producer.get(dq_a.input[0])
        if q_a is None or q_a.op_type != "QuantizeLinear":
            continue
        scale = numpy_helper.to_array(init[after[0].input[1]])
        for name in {q_a.input[1], dq_a.input[1]}:
            init[name].CopyFrom(
                numpy_helper.from_array(scale.astype(numpy_helper.to_array(init[name]).dtype), name)
            )
        changed += 1
    return changed


def _float_reader(
    node: onnx.NodeProto, float_names: set[str], consumers: dict[str, list[onnx.NodeProto]]
) -> bool:
    """A node that computes in float: kept float, or an activation whose output is not quantised."""
    if node.name in float_names:
        return True
    if node.op_type not in ("Clip", "Relu"):
        return False
    return not any(c.op_type == "QuantizeLinear" for c in consumers.get(node.output[0], []))


def dequantize_float_outputs(model: onnx.ModelProto, float_names: set[str]) -> int:
    """Drop Q/DQ pairs that only feed float nodes (the heads, the CAM, the mask decoder), and the pair in
    front of an activation whose output then stays float: the head conv reads INT8 and writes float.

    Such a pair adds rounding and no INT8 arithmetic (its readers dequantise anyway). Quantising the
    pooled embedding costs the severity and risk heads most: they weigh 1280 features by up to ~250."""
    removed = 0
    while True:
        producer = {o: n for n in model.graph.node for o in n.output}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        graph_outputs = {o.name for o in model.graph.output}

        pair = None
        for dq in model.graph.node:
            if dq.op_type != "DequantizeLinear" or dq.input[0] not in producer:
                continue
            q = producer[dq.input[0]]
            readers = consumers.get(dq.output[0], [])
            if q.op_type != "QuantizeLinear" or len(consumers.get(q.output[0], [])) != 1:
                continue
            if (
                readers
                and dq.output[0] not in graph_outputs
                and all(_float_reader(r, float_names, consumers) for r in readers)
            ):
                pair = (q, dq)
                break
        if pair is None:
            used = {name for node in model.graph.node for name in node.input}
            unused = [i for i in model.graph.initializer if i.name not in used]
            for initializer in unused:
                model.graph.initializer.remove(initializer)
            return removed
        q, dq = pair
        for node in consumers.get(dq.output[0], []):
            node.input[:] = [q.input[0] if i == dq.output[0] else i for i in node.input]
        model.graph.node.remove(q)
        model.graph.node.remove(dq)
        removed += 1


def check_tensorrt_qdq(model: onnx.ModelProto) -> dict[str, Any]:
    """What TensorRT 10 explicit quantisation needs: INT8, zero point 0, per-tensor activation scales,
    per-channel (axis 0) weight scales, no INT32 DequantizeLinear (float biases). Returns the problems
    found and which op types read a DequantizeLinear."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems: list[str] = []
    quantised: dict[str, int] = {}  # INT8 in, INT8 out: what TensorRT runs as INT8 kernels
    float_readers: dict[str, int] = {}  # float ops reading a dequantised tensor (the float heads)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = init.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zero is None:
                problems.append(f"{node.name}: no zero point (int8 needs an explicit int8 zero point)")
            elif zero.dtype != np.int8 or np.any(zero != 0):
                problems.append(f"{node.name}: zero point {zero.dtype} {zero.ravel()[:3]} (needs int8 0)")
            scale = init.get(node.input[1])
            weight = node.op_type == "DequantizeLinear" and node.input[0] in init
            if scale is None:
                problems.append(f"{node.name}: scale is not a constant")
            elif not weight and scale.size != 1:
                problems.append(f"{node.name}: per-channel activation scale")
            if weight and init[node.input[0]].dtype != np.int8:
                problems.append(f"{node.name}: {init[node.input[0]].dtype} input (TensorRT: int8 only)")
        elif any(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input):
            readers = [c for o in node.output for c in consumers.get(o, [])]
            int8_out = bool(readers) and all(c.op_type == "QuantizeLinear" for c in readers)
            table = quantised if int8_out else float_readers
            table[node.op_type] = table.get(node.op_type, 0) + 1
            if node.op_type == "Conv" and node.input[1] in producer:
                dq = producer[node.input[1]]
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
                scale = init.get(dq.input[1])
                if scale is None or scale.size != init[dq.input[0]].shape[0] or attrs.get("axis", 1) != 0:
                    problems.append(f"{node.name}: weights not per-channel on axis 0")
    return {"problems": problems, "quantised_op_types": quantised, "float_readers_of_int8": float_readers}
