"""A tiny multi-head conv model, built with onnx.helper, plus its FP16 and Q/DQ INT8 variants.

Heads like the real model's: abnormal (sigmoid), findings (sigmoid, three labels the data set
knows), view (softmax frontal/lateral), severity extent 0-8 (in-graph), heatmap (sigmoid map).
Weights are seeded random; `perturb` adds that much noise to the head weights (a different model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from appliance.manifest import sha256_file

SIZE = 64
FINDINGS = ["No Finding", "COVID-19", "Pneumonia"]


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def build(folder: Path, seed: int = 0, perturb: float = 0.0) -> Path:
    """Write model.onnx + manifest.yaml (fp32 only) into `folder`; return the manifest path."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _he(rng, (8, 1, 3, 3), 9),
        "b1": np.zeros(8, np.float32),
        "w2": _he(rng, (16, 8, 3, 3), 72),
        "b2": np.zeros(16, np.float32),
        "wh": _he(rng, (1, 16, 1, 1), 16) * 4,
        "w_abn": _he(rng, (16, 1), 16) * 4,
        "w_find": _he(rng, (16, 3), 16) * 4,
        "w_view": _he(rng, (16, 2), 16) * 4,
        "w_sev": _he(rng, (16, 1), 16) * 4,
        "eight": np.array([8.0], np.float32),
        "squeeze_axes": np.array([1], np.int64),
    }
    noise = np.random.default_rng(seed + 1000)
    for name in ("w_abn", "w_find", "w_view", "w_sev"):
        inits[name] = inits[name] + (noise.standard_normal(inits[name].shape) * perturb).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["feat"]),
        helper.make_node("Conv", ["feat", "wh"], ["heat4"]),
        helper.make_node("Squeeze", ["heat4", "squeeze_axes"], ["heatmap"]),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "w_abn"], ["abnormal"]),
        helper.make_node("MatMul", ["pooled", "w_find"], ["findings"]),
        helper.make_node("MatMul", ["pooled", "w_view"], ["view"]),
        helper.make_node("MatMul", ["pooled", "w_sev"], ["sev_logit"]),
        helper.make_node("Sigmoid", ["sev_logit"], ["sev_unit"]),
        helper.make_node("Mul", ["sev_unit", "eight"], ["severity"]),
    ]
    side = SIZE // 4
    graph = helper.make_graph(
        nodes,
        "tiny_conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("abnormal", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("findings", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("view", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("severity", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", side, side]),
        ],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    manifest = {
        "name": "tiny-conv",
        "version": "0.0.1",
        "onnx": {"fp32": {"file": "model.onnx", "sha256": sha256_file(folder / "model.onnx")}},
        "input": {
            "name": "image",
            "channels": 1,
            "height": SIZE,
            "width": SIZE,
            "intensity": {"range": [-1.0, 1.0]},
        },
        "outputs": [
            {"name": "abnormal", "role": "abnormal", "activation": "sigmoid", "labels": ["abnormal"]},
            {"name": "findings", "role": "findings", "activation": "sigmoid", "labels": FINDINGS},
            {"name": "view", "role": "view", "activation": "softmax", "labels": ["frontal", "lateral"]},
            {"name": "severity", "role": "severity", "labels": ["extent"], "ranges": {"extent": [0.0, 8.0]}},
            {"name": "heatmap", "role": "heatmap", "activation": "sigmoid"},
        ],
        "triage": {"abnormal_threshold": 0.5},
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def _register(manifest_path: Path, precision: str, file: str) -> None:
    manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    manifest["onnx"][precision] = {"file": file, "sha256": sha256_file(manifest_path.parent / file)}
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")


def add_fp16(manifest_path: Path) -> None:
    from onnxconverter_common import float16

    model = onnx.load(manifest_path.parent / "model.onnx")
    onnx.save(
        float16.convert_float_to_float16(model, keep_io_types=True), manifest_path.parent / "model.fp16.onnx"
    )
    _register(manifest_path, "fp16", "model.fp16.onnx")


def add_int8_qdq(manifest_path: Path, calibration: np.ndarray) -> None:
    """Explicit Q/DQ INT8 (symmetric, per-channel weights): the format TensorRT 10 builds from."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[dict[str, np.ndarray]] = iter(
                {"image": calibration[i : i + 1]} for i in range(len(calibration))
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    folder = manifest_path.parent
    quantize_static(
        str(folder / "model.onnx"),
        str(folder / "model.int8.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    _register(manifest_path, "int8", "model.int8.onnx")
