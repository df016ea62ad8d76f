"""The INT8 file for TensorRT 10 explicit quantisation, and how many leading blocks stay float.

Calibrated on training images through the appliance's own reading and preprocessing (quantize.py's
docstring has the settings and why); the float blocks are the fewest for which the candidate passes the
gate's label-free checks on other training images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from appliance.errors import UserError
from appliance.manifest import Manifest
from tools.engines.onnx_runs import run
from tools.engines.parity_gate import judge
from tools.engines.qdq_graph import (
    activation_scales_follow_clip,
    backbone_units,
    check_tensorrt_qdq,
    dequantize_float_outputs,
    float_nodes,
)

# Ops that carry Q/DQ in the INT8 graph. All are on TensorRT's explicit-quantisation list: Conv (regular
# and depthwise) fuses DQ(input) + DQ(weights) + Conv [+ Clip] + Q into an INT8 convolution, Add fuses
# with its input DQs and output Q (residual), Clip is a pointwise activation fused with the conv or the Q.
QDQ_OP_TYPES = ["Conv", "Add", "Clip"]
# On the selection images the deviation must stay within this share of the gate's limits: a 99th
# percentile estimated from a few hundred images is the 3rd-largest value or so, uncertain by ~20 %.
SELECTION_MARGIN = 0.8


class Calibration(CalibrationDataReader):
    """The calibration tensors, one image at a time, as the quantiser reads them."""

    def __init__(self, name: str, tensors: list[np.ndarray]) -> None:
        self.name = name
        self.items: Iterator[np.ndarray] = iter(tensors)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.items, None)
        return None if item is None else {self.name: item[None]}


def correct_biases(
    reference: onnx.ModelProto, model: onnx.ModelProto, calibration: np.ndarray, input_name: str
) -> list[str]:
    """Empirical bias correction: for each convolution that reads INT8 (graph order), add to its float
    bias the per-channel mean of (fp32 output - INT8 model output) on the calibration images, with every
    earlier correction already in place. `reference` is the BatchNorm-folded fp32 model the quantiser
    started from (same conv names and output tensors).

    Rounding weights and activations shifts each output channel's mean (a systematic error the next
    layers amplify); the bias stays float (TensorRT refuses an INT32 DequantizeLinear), so the shift can
    be taken out there and the graph stays what TensorRT reads: no Q/DQ, scale or zero point changes.
    Returns the corrected convs' names."""
    producer = {o: n for n in model.graph.node for o in n.output}
    in_reference = {o for n in reference.graph.node for o in n.output}
    convs = [
        n
        for n in model.graph.node
        if n.op_type == "Conv"
        and len(n.input) > 2
        and n.input[0] in producer
        and producer[n.input[0]].op_type == "DequantizeLinear"
        and n.output[0] in in_reference
    ]
    init = {i.name: i for i in model.graph.initializer}

    def channel_means(graph: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
        probe = onnx.ModelProto()
        probe.CopyFrom(graph)
        present = {o.name for o in probe.graph.output}
        probe.graph.output.extend(
            onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
            for n in names
            if n not in present
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for start in range(0, len(calibration), 16):
            for name, value in zip(
                names, sess.run(names, {input_name: calibration[start : start + 16]}), strict=True
            ):
                value = np.asarray(value, dtype=np.float64)
                sums[name] = sums.get(name, 0) + value.sum(axis=(0, 2, 3))
                counts[name] = counts.get(name, 0) + value.shape[0] * value.shape[2] * value.shape[3]
        return {n: sums[n] / counts[n] for n in names}

    target = channel_means(reference, [c.output[0] for c in convs])
    for conv in convs:
        shift = target[conv.output[0]] - channel_means(model, [conv.output[0]])[conv.output[0]]
        bias = init[conv.input[2]]
        value = numpy_helper.to_array(bias).astype(np.float64) + shift
        bias.CopyFrom(numpy_helper.from_array(value.astype(np.float32), bias.name))
    return [c.name for c in convs]


def make_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    input_name: str,
    method: str,
    float_blocks: int,
    bias_correction: bool = False,
) -> dict[str, Any]:
    # Fold BatchNorm into Conv first: Q/DQ on a raw conv output, before BN rescales each channel,
    # would put per-channel ranges that differ by orders of magnitude into one per-tensor scale.
    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    keep_float = float_nodes(model, float_blocks)
    quantize_static(
        str(prepared),
        str(out),
        Calibration(input_name, list(calibration)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep_float,
        calibrate_method=getattr(CalibrationMethod, method),
        # TensorRT: symmetric (zero point 0) and no INT32 bias DequantizeLinear.
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    quantised = onnx.load(str(out))
    dropped = dequantize_float_outputs(quantised, set(keep_float))
    fixed = activation_scales_follow_clip(quantised)
    corrected = correct_biases(model, quantised, calibration, input_name) if bias_correction else []
    prepared.unlink()
    onnx.save(quantised, str(out))
    onnx.checker.check_model(onnx.load(str(out)))
    check = check_tensorrt_qdq(quantised)
    if check["problems"]:
        raise UserError(f"{out}: not TensorRT explicit-quantisation Q/DQ: {check['problems'][:3]}")
    return {
        "float_blocks": float_blocks,
        "clip_scales": fixed,
        "float_output_pairs_dropped": dropped,
        "bias_corrected_convs": len(corrected),
        **check,
    }


def select_float_blocks(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    selection: np.ndarray,
    manifest: Manifest,
    bands: dict[str, dict[str, Any]],
    method: str,
    threads: int,
    bias_correction: bool = False,
) -> tuple[int, list[dict[str, Any]]]:
    """The fewest float leading blocks for which INT8 passes the gate's label-free checks on training
    images that were not used for calibration: no decision flip outside the band, and the deviation within
    SELECTION_MARGIN of its limit. Binary search: keeping more blocks float moves the candidate closer."""
    name = manifest.input.name
    reference = run(fp32, selection, name, threads=threads)
    units = backbone_units(onnx.load(str(fp32)))
    tried: dict[int, dict[str, Any]] = {}

    def within(n: int) -> bool:
        make_int8(fp32, out, calibration, name, method, n, bias_correction)
        worst = []
        for lower in (False, True):  # the file TensorRT reads, and the CPU lowering of it
            candidate = run(out, selection, name, threads=threads, lower=lower)
            verdict = judge(manifest, reference, candidate, {"bands": bands})
            worst += [
                c
                for c in verdict["checks"]
                if not c["ok"] or ("|Δ|" in c["check"] and c["value"] > SELECTION_MARGIN * c["limit"])
            ]
        tried[n] = {"float_blocks": n, "ok": not worst, "exceeded": [c["check"] for c in worst]}
        print(f"  float blocks {n}: {'within' if not worst else 'exceeds'} the limits on training images")
        return not worst

    low, high = 0, len(units) - 2  # high: the stem and every block float, only the head conv INT8
    if within(low):
        return low, list(tried.values())
    if not within(high):
        return high, list(tried.values())
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            high = middle
        else:
            low = middle
    return high, sorted(tried.values(), key=lambda t: t["float_blocks"])
