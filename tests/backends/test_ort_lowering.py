"""The in-memory CPU lowering of a TensorRT-form INT8 Q/DQ model (appliance.backends.ort_lowering).

A real small graph (1x1 expand + ReLU6, depthwise 3x3 + ReLU6, 1x1 project, residual Add: one
inverted-residual block as in EfficientNet-Lite) is quantised the way tools/engines/quantize.py does it
(ONNX Runtime quantize_static, symmetric INT8, per-channel weights, float biases, post-ReLU6 scales),
checked as TensorRT-form, lowered, and run in ONNX Runtime: the Clips disappear, the convolutions fuse
into QLinearConv, and the lowered model is at least as close to FP32 as the TensorRT-form file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.backends.ort_lowering import load_lowered, lower_int8_for_cpu
from testsupport.quant import quantize_for_tensorrt
from tools.engines.qdq_graph import activation_scales_follow_clip, check_tensorrt_qdq

CHANNELS, EXPANDED, SIDE = 8, 32, 16


def _block(path: Path) -> None:
    rng = np.random.default_rng(0)

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = {
        "w_expand": he((EXPANDED, CHANNELS, 1, 1), CHANNELS),
        "b_expand": rng.uniform(-0.5, 0.5, EXPANDED).astype(np.float32),
        "w_dw": he((EXPANDED, 1, 3, 3), 9),
        "b_dw": rng.uniform(-0.5, 0.5, EXPANDED).astype(np.float32),
        "w_project": he((CHANNELS, EXPANDED, 1, 1), EXPANDED) * 0.5,
        "b_project": np.zeros(CHANNELS, np.float32),
        "zero": np.array(0.0, np.float32),
        "six": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w_expand", "b_expand"], ["expand"], name="expand"),
        helper.make_node("Clip", ["expand", "zero", "six"], ["expand_act"], name="relu6_a"),
        helper.make_node(
            "Conv", ["expand_act", "w_dw", "b_dw"], ["dw"], name="dw", group=EXPANDED, pads=[1, 1, 1, 1]
        ),
        helper.make_node("Clip", ["dw", "zero", "six"], ["dw_act"], name="relu6_b"),
        helper.make_node("Conv", ["dw_act", "w_project", "b_project"], ["project"], name="project"),
        helper.make_node("Add", ["image", "project"], ["sum"], name="residual"),
        helper.make_node("Conv", ["sum", "w_project_out"], ["out"], name="head"),
    ]
    inits["w_project_out"] = he((4, CHANNELS, 1, 1), CHANNELS)
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", CHANNELS, SIDE, SIDE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, SIDE, SIDE])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2, 2, (n, CHANNELS, SIDE, SIDE)).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fp32, TensorRT-form int8) files, quantised with tools/engines/quantize.py's settings."""
    folder = tmp_path_factory.mktemp("lowering")
    fp32, int8 = folder / "block.onnx", folder / "block.int8.onnx"
    _block(fp32)
    quantize_for_tensorrt(fp32, int8, _inputs(16, 1))
    model = onnx.load(int8)
    assert activation_scales_follow_clip(model) == 2
    onnx.save(model, int8)
    return fp32, int8


def _session(model: str | bytes, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _optimized_ops(model: str | bytes, folder: Path) -> Counter[str]:
    target = folder / "optimized.onnx"
    _session(model, target)
    return Counter(n.op_type for n in onnx.load(target).graph.node)


def test_shipped_form_is_tensorrt_qdq_and_unfused_on_cpu(models: tuple[Path, Path], tmp_path: Path) -> None:
    _, int8 = models
    check = check_tensorrt_qdq(onnx.load(int8))
    assert check["problems"] == []
    ops = _optimized_ops(str(int8), tmp_path)
    assert ops["Clip"] == 2, ops  # symmetric INT8: ClipQuantFusion cannot drop the ReLU6
    assert ops["QLinearConv"] < 4, ops


def test_lowering_rewrites_relu6_and_signed_qdq_to_uint8(models: tuple[Path, Path]) -> None:
    _, int8 = models
    model = onnx.load(int8)
    inits_before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    before = {
        n.name: float(inits_before[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"
    }
    report = lower_int8_for_cpu(model)
    onnx.checker.check_model(model)
    assert report.relu_to_uint8 == 2  # the two Q after ReLU6
    assert report.pre_activation_pairs_removed == 2  # the Q/DQ in front of each ReLU6
    assert report.signed_to_uint8 == len(before) - 4  # input, project, residual sum
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in inits:
            assert inits[node.input[2]].dtype == np.uint8, node.name
        if node.op_type == "QuantizeLinear" and node.input[0] in {"expand_act", "dw_act"}:
            scale, zero = float(inits[node.input[1]]), int(inits[node.input[2]])
            assert zero == 0 and np.float32(255) * np.float32(scale) <= 6.0
            # same range as the INT8 Q it replaces, at least twice as fine a step
            assert scale * 255 == pytest.approx(min(6.0, 127 * before[node.name]), rel=1e-6)
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(inits[n.input[0]].dtype == np.int8 for n in weights)  # s8 per-channel kept


def test_lowered_model_fuses_on_cpu(models: tuple[Path, Path], tmp_path: Path) -> None:
    _, int8 = models
    lowered, _ = load_lowered(int8)
    ops = _optimized_ops(lowered, tmp_path)
    assert ops["Clip"] == 0, ops
    assert ops["QLinearConv"] == 4, ops  # expand, depthwise, project, head
    assert ops["QLinearAdd"] == 1, ops


def test_lowered_model_is_as_close_to_fp32_as_the_tensorrt_form(models: tuple[Path, Path]) -> None:
    fp32, int8 = models
    lowered, _ = load_lowered(int8)
    x = _inputs(8, 2)
    reference = _session(str(fp32)).run(None, {"image": x})[0]
    shipped = _session(str(int8)).run(None, {"image": x})[0]
    cpu = _session(lowered).run(None, {"image": x})[0]
    scale = float(np.abs(reference).max())
    shipped_error = float(np.abs(shipped - reference).mean())
    cpu_error = float(np.abs(cpu - reference).mean())
    assert cpu_error <= shipped_error * 1.05, (cpu_error, shipped_error)
    assert float(np.abs(cpu - reference).max()) < 0.03 * scale
    assert float(np.abs(cpu - shipped).max()) < 0.03 * scale


def test_non_int8_models_are_left_alone(models: tuple[Path, Path]) -> None:
    fp32, _ = models
    model = onnx.load(fp32)
    before = model.SerializeToString()
    report = lower_int8_for_cpu(model)
    assert report.changed == 0 and model.SerializeToString() == before


def test_backend_lowers_int8_on_the_cpu_only_when_configured(tmp_path: Path) -> None:
    from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
    from appliance.manifest import Precision, load_manifest
    from tests.backends import tiny_conv

    path = tiny_conv.build(tmp_path / "tiny")
    rng = np.random.default_rng(3)
    tiny_conv.add_int8_qdq(
        path, rng.uniform(-1, 1, (8, 1, tiny_conv.SIZE, tiny_conv.SIZE)).astype(np.float32)
    )
    manifest = load_manifest(path)
    x = rng.uniform(-1, 1, (2, 1, tiny_conv.SIZE, tiny_conv.SIZE)).astype(np.float32)
    lowered = OnnxRuntimeBackend(manifest, Precision.int8, OnnxRuntimeConfig(intra_op_threads=1))
    as_is = OnnxRuntimeBackend(
        manifest, Precision.int8, OnnxRuntimeConfig(intra_op_threads=1, int8_cpu_lowering=False)
    )
    fp32 = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=1))
    assert lowered.lowering is not None and lowered.lowering.relu_to_uint8 == 2
    assert as_is.lowering is None and fp32.lowering is None
    a, b, ref = lowered.run(x), as_is.run(x), fp32.run(x)
    for name, value in ref.items():
        spread = float(np.abs(value).max()) + 1e-6
        assert float(np.abs(a[name] - ref[name]).max()) <= 0.1 * spread, name
        assert float(np.abs(a[name] - b[name]).max()) <= 0.1 * spread, name
