"""The parity gate's backend-agnostic core, on the CPU: ORT FP32 vs ORT FP16 / Q/DQ INT8 / another model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.manifest import Precision, load_manifest
from tests.backends import tiny_conv
from tests.backends.conftest import tensorrt_unusable
from tools.engines.check_parity import ParityReport, compare_backends, load_inputs
from tools.training import dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny conv model with FP16 and Q/DQ INT8 variants (calibrated on images disjoint from the parity set)."""
    path = tiny_conv.build(tmp_path_factory.mktemp("parity") / "tiny")
    calibration, _ = load_inputs(load_manifest(path), dataset.data_dir(None), 32, offset=1)
    tiny_conv.add_fp16(path)
    tiny_conv.add_int8_qdq(path, calibration)
    return path


@pytest.fixture(scope="module")
def inputs(model: Path) -> tuple[np.ndarray, list[dataset.Record]]:
    return load_inputs(load_manifest(model), dataset.data_dir(None), 160)


def _compare(
    model: Path, precision: Precision, inputs: tuple[np.ndarray, list[dataset.Record]]
) -> ParityReport:
    manifest = load_manifest(model)
    reference = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(), 8)
    candidate = OnnxRuntimeBackend(manifest, precision, OnnxRuntimeConfig(), 8)
    return compare_backends(reference, candidate, manifest, inputs[0], inputs[1], batch_size=8)


def _row(report: ParityReport, key: str) -> dict[str, Any]:
    return next(r for r in report.gate["scores"] if r["key"] == key)


def test_fp16_passes_the_gate(model: Path, inputs: tuple[np.ndarray, list[dataset.Record]]) -> None:
    report = _compare(model, Precision.fp16, inputs)
    assert report.passed, report.to_json()
    heads = {h.output: h for h in report.heads}
    assert report.images == 160 and set(heads) == {"abnormal", "findings", "view", "severity", "heatmap"}
    # Ground truth from metadata.csv was found for the labelled heads, and FP16 moved scores a little.
    assert "auc_delta[abnormal]" in heads["abnormal"].metrics
    assert "auc_delta[COVID-19]" in heads["findings"].metrics
    assert 0 < heads["findings"].metrics["max_abs"] < 0.01  # type: ignore[operator]
    severity = _row(report, "severity.extent")
    assert severity["mean_abs"] is not None and severity["band"] >= 0
    # The band came from measured reading noise, stored next to the model for the next run.
    assert report.noise is not None and report.noise["band_source"] in ("decode", "reencode")
    assert (model.parent / "parity_noise.json").is_file()


def test_int8_qdq_is_explicit_and_close(model: Path, inputs: tuple[np.ndarray, list[dataset.Record]]) -> None:
    """The Q/DQ ONNX (TensorRT 10's INT8 input) runs in ONNX Runtime and stays near FP32.

    A random tiny model's INT8 may fail the gate; the gate's verdict on the real model is what matters.
    Here we check quantisation happened, is sane, and that every decision flip is counted."""
    qdq = onnx.load(model.parent / "model.int8.onnx")
    ops = {node.op_type for node in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    report = _compare(model, Precision.int8, inputs)
    abnormal = _row(report, "abnormal.abnormal")
    assert 0 < abnormal["mean_abs"] < 0.5  # logits
    view = _row(report, "view")
    flips = sum(p["inside_band"] + p["outside_band"] for p in view["points"])
    assert flips <= 0.1 * report.images
    assert _row(report, "severity.extent")["mean_abs"] < 0.5
    print(report.to_json())


def test_a_different_model_fails_and_the_head_is_named(
    model: Path, inputs: tuple[np.ndarray, list[dataset.Record]], tmp_path: Path
) -> None:
    other = tiny_conv.build(tmp_path / "other", perturb=0.5)
    # Register the perturbed graph as this model's "fp16" to run it through the same comparison.
    (model.parent / "model.other.onnx").write_bytes((other.parent / "model.onnx").read_bytes())
    copy = model.parent / "manifest.other.yaml"
    copy.write_text(model.read_text())
    tiny_conv._register(copy, "fp16", "model.other.onnx")
    report = _compare(copy, Precision.fp16, inputs)
    assert not report.passed
    failing = {h.output for h in report.heads if h.failures}
    assert failing & {"abnormal", "findings", "view", "severity"}
    assert "heatmap" not in failing  # the map branch was not perturbed


def test_cli_compares_onnx_variants_and_writes_a_report(model: Path, tmp_path: Path) -> None:
    report = tmp_path / "parity.json"
    command = [
        sys.executable,
        "-m",
        "tools.engines.check_parity",
        "--model",
        str(model),
        "--candidate",
        "onnx:fp16",
    ]
    done = subprocess.run(
        [*command, "--limit", "40", "--report", str(report)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parity PASSED: onnxruntime/fp16 vs onnxruntime/fp32" in done.stdout
    assert '"passed": true' in report.read_text()


def test_cli_tensorrt_candidate_without_tensorrt_is_a_plain_error(model: Path) -> None:
    if tensorrt_unusable() is None:
        pytest.skip("TensorRT and a GPU are here")
    done = subprocess.run(
        [sys.executable, "-m", "tools.engines.check_parity", "--model", str(model), "--limit", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "error: TensorRT Python package not importable" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_parity_names_the_engine_build_engine_built_with_its_own_options(model: Path) -> None:
    """Found by a review: check_parity planned from the config alone, so an engine built with
    --workspace-mb or --dla-core (build_engine's options) was never found to be checked."""
    from appliance.backends.tensorrt import plan_engine
    from appliance.engine_cache import DeviceIdentity
    from tools.engines import build_engine, check_parity
    from tools.engines.engine_target import load_target

    orin = DeviceIdentity(
        gpu_name="Orin", compute_capability="8.7", tensorrt_version="10.3.0", l4t_release=None
    )
    options = ["--model", str(model), "--workspace-mb", "2048", "--dla-core", "0", "--precision", "fp16"]
    built, checked = (load_target(tool.parse_args(options)) for tool in (build_engine, check_parity))
    paths = [
        plan_engine(t.manifest, t.config, orin, t.precision, t.max_batch).engine_path
        for t in (built, checked)
    ]
    assert paths[0] == paths[1]
    default = load_target(check_parity.parse_args(["--model", str(model), "--precision", "fp16"]))
    assert (
        plan_engine(default.manifest, default.config, orin, "fp16", default.max_batch).engine_path != paths[0]
    )
