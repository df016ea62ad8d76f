"""Two structurally different ONNX models, built here, to prove a model needs a manifest, not code.

- `xrv_like`: NCHW, 1 channel, intensity [-1024, 1024] (torchxrayvision's convention), sigmoid
  logits over its own label list, plus the input's mean as an `embedding` output so a test can check
  which tensor the model actually saw.
- `keras_like`: NHWC, 3 channels, x/127.5 - 1 (Keras' convention), softmax computed inside the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from appliance.manifest import sha256_file


def _save(model: onnx.ModelProto, folder: Path, manifest: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    manifest["onnx"] = {"fp32": {"file": "model.onnx", "sha256": sha256_file(folder / "model.onnx")}}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def xrv_like(folder: Path, size: int = 64) -> Path:
    weights = numpy_helper.from_array(np.array([[0.004, -0.003, 0.002]], dtype=np.float32), "w")
    bias = numpy_helper.from_array(np.array([0.5, -0.2, 0.1], dtype=np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["img"], ["pooled4"], axes=[2, 3], keepdims=0),
            helper.make_node("Identity", ["pooled4"], ["mean_intensity"]),
            helper.make_node("MatMul", ["pooled4", "w"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "xrv_like",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 1, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("mean_intensity", TensorProto.FLOAT, ["N", 1]),
        ],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    manifest = {
        "name": "xrv-like",
        "version": "0.0.1",
        "input": {
            "name": "img",
            "layout": "NCHW",
            "channels": 1,
            "height": size,
            "width": size,
            "aspect": "center_crop",
            "intensity": {"range": [-1024.0, 1024.0], "mean": [0.0], "std": [1.0]},
        },
        "outputs": [
            {
                "name": "logits",
                "role": "findings",
                "activation": "sigmoid",
                "labels": ["Atelectasis", "Effusion", "Pneumonia"],
                "thresholds": {"Atelectasis": 0.5, "Effusion": 0.5, "Pneumonia": 0.5},
            },
            {"name": "mean_intensity", "role": "embedding", "labels": ["mean"]},
        ],
    }
    return _save(model, folder, manifest)


def keras_like(folder: Path, size: int = 48) -> Path:
    weights = numpy_helper.from_array(
        np.array([[2.0, -2.0], [1.0, -1.0], [0.5, -0.5]], dtype=np.float32), "w"
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "ReduceMean", ["input_1"], ["pooled"], axes=[1, 2], keepdims=0
            ),  # NHWC -> (N, 3)
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "keras_like",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    manifest = {
        "name": "keras-like",
        "version": "0.0.1",
        "input": {
            "name": "input_1",
            "layout": "NHWC",
            "channels": 3,
            "height": size,
            "width": size,
            "aspect": "stretch",
            "intensity": {"range": [-1.0, 1.0], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        },
        "outputs": [
            {
                "name": "probs",
                "role": "findings",
                "activation": "none",
                "labels": ["normal", "pneumonia"],
                "normal_label": "normal",
                "thresholds": {"pneumonia": 0.5},
            }
        ],
    }
    return _save(model, folder, manifest)
