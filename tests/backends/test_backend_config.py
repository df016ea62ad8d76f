"""`inference.backend` as a discriminated union, one precision and one batch, and older configs read or refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.backends.onnxruntime import OnnxRuntimeBackendConfig
from appliance.backends.select import AutoBackendConfig, onnxruntime_precision, tensorrt_settings
from appliance.backends.tensorrt import TensorRTBackendConfig, engine_precision
from appliance.config import InferenceConfig, load_config
from appliance.errors import ConfigError, UserError
from appliance.manifest import Precision

OLDER = """\
inference:
  backend: auto
  precision: fp32
  max_batch: 8
  onnxruntime:
    intra_op_threads: 2
  tensorrt:
    precision: fp16
    workspace_mb: 2048
    opt_batch: 1
    max_batch: 4
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_name_and_mapping_are_the_same_config() -> None:
    assert InferenceConfig(backend="onnxruntime") == InferenceConfig(backend={"type": "onnxruntime"})
    assert isinstance(InferenceConfig().backend, AutoBackendConfig)
    tensorrt = InferenceConfig.model_validate({"backend": {"type": "tensorrt", "workspace_mb": 512}})
    assert isinstance(tensorrt.backend, TensorRTBackendConfig) and tensorrt.backend.workspace_mb == 512
    assert tensorrt_settings(tensorrt) is tensorrt.backend


def test_older_shape_is_read_with_warnings_naming_the_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, OLDER)
    with caplog.at_level(logging.WARNING, logger="appliance.config"):
        inference = load_config(path).inference
    backend = inference.backend
    assert isinstance(backend, AutoBackendConfig)
    assert backend.onnxruntime.intra_op_threads == 2 and backend.tensorrt.workspace_mb == 2048
    # fp32 for ONNX Runtime + fp16 for TensorRT was exactly what `auto` means now.
    assert (inference.precision, inference.max_batch) == ("auto", 8)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path}:8: inference.tensorrt.precision is read as inference.precision: auto" in warned
    assert f"{path}:10: inference.tensorrt.opt_batch 1 is no longer read" in warned
    assert f"{path}:11: inference.tensorrt.max_batch is replaced by inference.max_batch (8)" in warned


def test_precisions_one_setting_cannot_keep_are_refused_naming_lines_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, "inference:\n  backend: auto\n  precision: fp32\n  tensorrt:\n    precision: int8\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:5: inference.tensorrt.precision (int8)")
    assert f"inference.precision (fp32, {path}:3)" in message
    assert "choose inference.precision: int8" in message


def test_explicit_tensorrt_keeps_its_engine_precision(tmp_path: Path) -> None:
    path = write(tmp_path, "inference:\n  backend: tensorrt\n  tensorrt:\n    precision: int8\n")
    assert load_config(path).inference.precision == "int8"  # ONNX Runtime never ran: nothing to keep


def test_errors_in_moved_or_tagged_sections_name_the_written_line(tmp_path: Path) -> None:
    older = write(tmp_path, "inference:\n  backend: auto\n  tensorrt:\n    workspace_mb: 1\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:4: inference\.tensorrt\.workspace_mb: Input should"):
        load_config(older)
    newer = write(tmp_path, "inference:\n  backend:\n    type: tensorrt\n    opt_batch: 2\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:4: inference\.backend\.opt_batch: unknown key"):
        load_config(newer)


def test_sections_beside_a_mapping_backend_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "inference:\n  backend: {type: auto, tensorrt: {}}\n  onnxruntime:\n    intra_op_threads: 2\n",
    )
    with pytest.raises(
        ConfigError, match=r"config\.yaml:3: inference\.onnxruntime: .*give these settings inside it"
    ):
        load_config(path)


def test_one_precision_means_each_backends_own_model() -> None:
    assert [onnxruntime_precision(p) for p in ("auto", "fp32", "fp16", "int8", "best")] == [
        Precision.fp32,
        Precision.fp32,
        Precision.fp16,
        Precision.int8,
        Precision.int8,
    ]
    assert [engine_precision(p) for p in ("auto", "fp16", "int8", "best")] == ["fp16", "fp16", "int8", "best"]
    with pytest.raises(UserError, match="fp32 runs on ONNX Runtime"):
        engine_precision("fp32")
    assert isinstance(InferenceConfig(backend="onnxruntime").backend, OnnxRuntimeBackendConfig)
