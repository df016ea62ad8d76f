"""tools/engines/quantize_int8.py correct_biases: the INT8 file's float biases absorb the mean output shift
that rounding causes, and nothing TensorRT reads changes (Q/DQ, scales, zero points, INT8 weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from testsupport.quant import quantize_for_tensorrt
from tools.engines.qdq_graph import activation_scales_follow_clip, check_tensorrt_qdq
from tools.engines.quantize_int8 import correct_biases

C, E, SIDE = 8, 32, 12


def _model(path: Path) -> None:
    rng = np.random.default_rng(3)
    inits = {
        "w1": (rng.standard_normal((E, C, 1, 1)) * 0.5).astype(np.float32),
        "b1": rng.uniform(-0.5, 0.5, E).astype(np.float32),
        "w2": (rng.standard_normal((E, 1, 3, 3)) * 0.5).astype(np.float32),
        "b2": rng.uniform(-0.5, 0.5, E).astype(np.float32),
        "w3": (rng.standard_normal((C, E, 1, 1)) * 0.2).astype(np.float32),
        "b3": np.zeros(C, np.float32),
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="expand"),
        helper.make_node("Clip", ["c1", "zero", "six"], ["a1"], name="relu6_a"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="dw", group=E, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "zero", "six"], ["a2"], name="relu6_b"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="project"),
        helper.make_node("Relu", ["c3"], ["out"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", C, SIDE, SIDE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", C, SIDE, SIDE])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def _out(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["out"], {"image": x})[0]


def test_bias_correction_removes_the_mean_shift_and_keeps_the_tensorrt_form(tmp_path: Path) -> None:
    fp32_path, int8_path = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    _model(fp32_path)
    # Calibrated on small inputs, used on shifted ones: a coarse step with a systematic error.
    x = np.random.default_rng(0).uniform(0, 2, (32, C, SIDE, SIDE)).astype(np.float32)
    quantize_for_tensorrt(fp32_path, int8_path, x[:8])
    fp32, int8 = onnx.load(fp32_path), onnx.load(int8_path)
    activation_scales_follow_clip(int8)
    before = onnx.ModelProto()
    before.CopyFrom(int8)

    corrected = correct_biases(fp32, int8, x, "image")

    assert corrected == ["expand", "dw", "project"]
    assert not check_tensorrt_qdq(int8)["problems"]
    onnx.checker.check_model(int8)
    old = {i.name: numpy_helper.to_array(i) for i in before.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    assert old.keys() == new.keys()
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed and changed <= {"b1", "b2", "b3"}
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in int8.graph.node]

    ref = _out(fp32, x)
    shift_before = np.abs((_out(before, x) - ref).mean(axis=(0, 2, 3)))
    shift_after = np.abs((_out(int8, x) - ref).mean(axis=(0, 2, 3)))
    assert shift_after.max() < 0.2 * shift_before.max()
    # The output error as a whole does not grow.
    assert np.abs(_out(int8, x) - ref).mean() <= np.abs(_out(before, x) - ref).mean()
