"""Lower a TensorRT-form INT8 Q/DQ model (symmetric INT8 activations) to what ONNX Runtime's CPU
provider fuses best, in memory, at load time. The shipped file is not changed: TensorRT reads it as is.

TensorRT 10 explicit quantisation needs signed INT8 activations with zero point 0. On the CPU, ONNX
Runtime fuses DQ -> Conv -> Q into a u8-activation `QLinearConv` (and DQ + DQ -> Add -> Q into
`QLinearAdd`), but two things in the symmetric graph stop it:

1. ReLU6. `ClipQuantFusion` drops a Clip only when the Q's representable range lies inside the Clip's
   range; an INT8 zero-point-0 range [-128 s, 127 s] never lies inside [0, 6], so the Clip stays, in
   float, with a DQ and a Q around it (and the Conv in front of it is not fused).
2. Fan-out. ONNX Runtime turns an s8 Q/DQ pair into u8 only when the Q has a single consumer; the
   residual stream is read twice, so the convolutions around it stay unfused.

The rewrite, per activation QuantizeLinear with INT8 zero point 0 and a per-tensor scale s:

- its input is Clip(min=0, max=m) or Relu (m = inf): UINT8, zero point 0, scale
  s' = min(m, 127 s) / 255. The represented range is the same [0, min(m, 127 s)] (the INT8 Q's negative
  half is removed by the Clip anyway), the step is finer (s' <= s / 2), so the result is at least as
  close to FP32 as the INT8 graph. ONNX Runtime then removes the Clip and fuses the Conv.
  If that Clip reads a DQ whose Q has the same scale and no other reader (the pre-activation Q/DQ pair
  `tools/engines/quantize.py` leaves in front of every ReLU6), that pair is removed first: with the same scale and
  the Clip after it, it only rounds a second time.
- otherwise (signed data: residual stream, projection outputs): UINT8 with zero point 128 and the same
  scale, which represents exactly the same values [-128 s, 127 s]: no numerical change.

Weights (initialiser inputs of DequantizeLinear) stay INT8 per channel: ONNX Runtime's u8 x s8 kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

ACTIVATIONS = ("Clip", "Relu")


@dataclass
class LoweringReport:
    """What `lower_int8_for_cpu` changed."""

    relu_to_uint8: int = 0  # Q after Clip/Relu: uint8, zero point 0, range kept, step finer
    signed_to_uint8: int = 0  # other activation Q: uint8, zero point 128, same values
    pre_activation_pairs_removed: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return self.relu_to_uint8 + self.signed_to_uint8 + self.pre_activation_pairs_removed


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _clip_range(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(min, max) of a Clip or Relu with constant bounds, None when they are not constants."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    bounds = [float("-inf"), float("inf")]
    for attr in node.attribute:  # opset < 11
        if attr.name in ("min", "max"):
            bounds[attr.name == "max"] = float(attr.f)
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            value = _constant(model, node.input[index])
            if value is None or value.size != 1:
                return None
            bounds[index - 1] = float(value.reshape(()))
    return bounds[0], bounds[1]


def _largest_step_within(limit: float) -> np.float32:
    """The largest float32 s with 255 * s <= limit in float32 (what ClipQuantFusion compares)."""
    step = np.float32(limit / 255.0)
    while np.float32(255.0) * step > np.float32(limit):
        step = np.nextafter(step, np.float32(0.0))
    return step


def lower_int8_for_cpu(model: onnx.ModelProto) -> LoweringReport:
    """Rewrite `model` in place (see the module docstring) and return what changed."""
    report = LoweringReport()
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def add_init(value: np.ndarray, name: str) -> str:
        unique, k = name, 0
        while unique in inits:
            k += 1
            unique = f"{name}_{k}"
        tensor = numpy_helper.from_array(value, unique)
        graph.initializer.append(tensor)
        inits[unique] = tensor
        return unique

    def symmetric_int8(q: onnx.NodeProto) -> np.float32 | None:
        """The scale of an activation Q with a scalar scale and INT8 zero point 0, else None."""
        if len(q.input) < 3 or not q.input[2] or q.input[0] in inits:
            return None
        scale, zero = array(q.input[1]), array(q.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            return None
        if zero.dtype != np.int8 or int(zero.reshape(())) != 0:
            return None
        return np.float32(scale.reshape(()))

    removed: set[int] = set()

    def after_activation(q: onnx.NodeProto) -> bool:
        source = producer.get(q.input[0])
        return source is not None and source.op_type in ACTIVATIONS

    # Quantizers after an activation first: the pre-activation pair they remove is still INT8 then.
    quantizers = sorted(
        (n for n in graph.node if n.op_type == "QuantizeLinear"), key=lambda n: not after_activation(n)
    )
    for q in quantizers:
        if id(q) in removed:
            continue
        scale = symmetric_int8(q)
        if scale is None:
            continue
        readers = consumers.get(q.output[0], [])
        if (
            not readers
            or any(r.op_type != "DequantizeLinear" for r in readers)
            or q.output[0] in graph_outputs
        ):
            report.skipped.append(f"{q.name}: read by something other than DequantizeLinear")
            continue
        source = producer.get(q.input[0])
        bounds = _clip_range(model, source) if source is not None and source.op_type in ACTIVATIONS else None
        if bounds is not None and bounds[0] == 0.0 and bounds[1] > 0.0:
            top = min(bounds[1], 127.0 * float(scale))
            new_scale, new_zero = _largest_step_within(top), np.zeros((), np.uint8)
            report.relu_to_uint8 += 1
            assert source is not None
            # The pre-activation pair: Q(same scale) -> DQ -> Clip, read by nothing else.
            dq_in = producer.get(source.input[0])
            q_in = producer.get(dq_in.input[0]) if dq_in is not None else None
            if (
                dq_in is not None
                and q_in is not None
                and dq_in.op_type == "DequantizeLinear"
                and q_in.op_type == "QuantizeLinear"
                and symmetric_int8(q_in) == scale
                and len(consumers.get(dq_in.output[0], [])) == 1
                and len(consumers.get(q_in.output[0], [])) == 1
                and dq_in.output[0] not in graph_outputs
                and q_in.output[0] not in graph_outputs
            ):
                source.input[0] = q_in.input[0]
                removed.update((id(q_in), id(dq_in)))
                report.pre_activation_pairs_removed += 1
        else:
            new_scale, new_zero = scale, np.full((), 128, np.uint8)
            report.signed_to_uint8 += 1
        scale_name = add_init(np.asarray(new_scale, np.float32).reshape(()), f"{q.output[0]}_u8_scale")
        zero_name = add_init(new_zero, f"{q.output[0]}_u8_zero_point")
        for node in (q, *readers):
            node.input[1], node.input[2] = scale_name, zero_name
    if removed:
        kept = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return report


def load_lowered(path: str | os.PathLike[str]) -> tuple[bytes, LoweringReport]:
    """The model at `path`, lowered for ONNX Runtime's CPU provider, serialised for InferenceSession."""
    model = onnx.load(os.fspath(path))
    report = lower_int8_for_cpu(model)
    return model.SerializeToString(), report
