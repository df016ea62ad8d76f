"""TensorRT backend: planning and trtexec text everywhere; building and running only where TensorRT is.

The tests marked `tensorrt` build real engines from the tiny conv model and compare them with ONNX
Runtime. Without TensorRT, pycuda or a CUDA GPU they SKIP with the reason; nothing stands in for TensorRT.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.backends.select import open_tensorrt
from appliance.backends.tensorrt import (
    TensorRTBackend,
    TensorRTConfig,
    build_engine,
    current_device,
    import_tensorrt,
    major_version,
    plan_engine,
    trtexec_command,
)
from appliance.engine_cache import DeviceIdentity, EngineMismatch, find_engine
from appliance.errors import BackendUnavailable, ManifestError, UserError
from appliance.manifest import Precision, load_manifest
from tests.backends import tiny_conv
from tests.backends.conftest import tensorrt_missing, tensorrt_unusable
from tools.engines.check_parity import compare_backends, load_inputs
from tools.training import dataset
from tools.training.dataset import data_dir

ORIN = DeviceIdentity(
    gpu_name="Orin", compute_capability="8.7", tensorrt_version="10.3.0", l4t_release="R36.4.3"
)
XAVIER_JP5 = DeviceIdentity(
    gpu_name="Xavier", compute_capability="7.2", tensorrt_version="8.5.2.2", l4t_release="R35.5.0"
)
NO_TENSORRT = tensorrt_missing()
UNUSABLE = tensorrt_unusable()


@pytest.fixture
def with_int8(tiny_model: Path) -> Path:
    manifest = load_manifest(tiny_model)
    calibration, _ = load_inputs(manifest, data_dir(None), 32, offset=1)
    tiny_conv.add_int8_qdq(tiny_model, calibration)
    return tiny_model


def test_module_imports_without_tensorrt_and_says_why() -> None:
    if NO_TENSORRT is None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendUnavailable, match="TensorRT Python package not importable: No module named"):
        import_tensorrt()
    with pytest.raises(BackendUnavailable, match="TensorRT Python package not importable"):
        current_device()


def test_fp16_plan_builds_from_the_fp32_onnx(tiny_model: Path) -> None:
    manifest = load_manifest(tiny_model)
    plan = plan_engine(manifest, TensorRTConfig(), ORIN, precision="auto", max_batch=8)
    assert plan.onnx_path == manifest.onnx_path(Precision.fp32)
    assert plan.spec.onnx_sha256 == manifest.onnx[Precision.fp32].sha256
    assert (plan.spec.min_batch, plan.spec.opt_batch, plan.spec.max_batch) == (1, 1, 8)
    assert plan.spec.input_shape == (1, 64, 64)
    assert plan.flags == ["FP16"] and plan.calibration_cache is None
    assert plan.engine_path.parent == manifest.folder / "cache"
    assert plan.engine_path.name == f"tiny-conv.fp16.{plan.key[:16]}.engine"


def test_int8_on_tensorrt10_uses_the_qdq_onnx(with_int8: Path) -> None:
    manifest = load_manifest(with_int8)
    plan = plan_engine(manifest, TensorRTConfig(), ORIN, precision="int8")
    assert plan.onnx_path.name == "model.int8.onnx"
    assert plan.spec.int8_source == "qdq" and plan.calibration_cache is None
    assert plan.spec.onnx_sha256 == manifest.onnx[Precision.int8].sha256
    best = plan_engine(manifest, TensorRTConfig(), ORIN, precision="best")
    assert best.flags == ["FP16", "INT8"] and best.key != plan.key


def test_int8_on_tensorrt10_without_qdq_onnx_names_the_fix(tiny_model: Path) -> None:
    with pytest.raises(ManifestError, match=r"has no int8 ONNX.*tools/engines/quantize\.py"):
        plan_engine(load_manifest(tiny_model), TensorRTConfig(), ORIN, precision="int8")


def test_int8_on_tensorrt8_calibrates_the_fp32_onnx(tiny_model: Path) -> None:
    plan = plan_engine(load_manifest(tiny_model), TensorRTConfig(), XAVIER_JP5, precision="int8")
    assert major_version(XAVIER_JP5.tensorrt_version) == 8
    assert plan.onnx_path.name == "model.onnx" and plan.spec.int8_source == "calibration"
    assert plan.calibration_cache == plan.engine_path.with_suffix(".calib")


def test_bad_batch_or_precision_is_a_user_error(tiny_model: Path) -> None:
    # One batch setting now: the profile is 1 / OPT_BATCH / max_batch, so only max_batch can be wrong.
    with pytest.raises(UserError, match=r"inference\.max_batch 0: an engine needs at least 1"):
        plan_engine(load_manifest(tiny_model), TensorRTConfig(), ORIN, max_batch=0)
    with pytest.raises(UserError, match=r"inference\.precision fp32: TensorRT engines are built as fp16"):
        plan_engine(load_manifest(tiny_model), TensorRTConfig(), ORIN, precision="fp32")


def test_changed_onnx_is_refused_before_planning(tiny_model: Path) -> None:
    (tiny_model.parent / "model.onnx").write_bytes(b"not the model the manifest names")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        plan_engine(load_manifest(tiny_model), TensorRTConfig(), ORIN)


def test_trtexec_command_text(tiny_model: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_model)
    config = TensorRTConfig(workspace_mb=512, dla_core=1, engine_cache=tmp_path / "c")
    plan = plan_engine(manifest, config, ORIN, max_batch=4)
    assert trtexec_command(plan) == [
        "trtexec",
        f"--onnx={manifest.folder / 'model.onnx'}",
        f"--saveEngine={plan.engine_path}",
        "--minShapes=image:1x1x64x64",
        "--optShapes=image:1x1x64x64",
        "--maxShapes=image:4x1x64x64",
        "--memPoolSize=workspace:512",
        f"--timingCacheFile={tmp_path / 'c' / 'Orin-sm8.7-trt10.3.0.timing.cache'}",
        "--fp16",
        "--useDLACore=1",
        "--allowGPUFallback",
    ]
    calibrated = plan_engine(manifest, TensorRTConfig(), XAVIER_JP5, precision="best")
    command = trtexec_command(calibrated)
    assert command[-3:] == ["--fp16", "--int8", f"--calib={calibrated.calibration_cache}"]


# ----------------------------------------------------------------------------- real TensorRT only


def _parity_inputs(manifest_path: Path) -> tuple[np.ndarray, list[dataset.Record]]:
    return load_inputs(load_manifest(manifest_path), data_dir(None), 64)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.tensorrt
@pytest.mark.skipif(UNUSABLE is not None, reason=f"TensorRT cannot run here: {UNUSABLE}")
def test_engine_builds_runs_and_matches_onnxruntime(with_int8: Path, precision: str) -> None:
    manifest = load_manifest(with_int8)
    config = TensorRTConfig(require_parity=False)
    device = current_device()
    plan = plan_engine(manifest, config, device, precision, max_batch=4)
    record = build_engine(plan, progress=print)
    assert plan.timing_cache.is_file() and plan.sidecar_path.is_file()
    path, found = find_engine(plan.engine_path.parent, plan.spec, device)
    assert found == record and path == plan.engine_path
    engine = open_tensorrt(manifest, config, precision, max_batch=4)
    assert isinstance(engine, TensorRTBackend) and engine.precision == precision
    reference = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(), 4)
    inputs, records = _parity_inputs(with_int8)
    odd = engine.run(inputs[:7])  # 7 > max batch 4: split into 4 + 3, shapes follow the batch
    assert odd["heatmap"].shape == (7, 16, 16)
    report = compare_backends(reference, engine, manifest, inputs, records)
    engine.close()
    if precision == "fp16":
        assert report.passed, report.to_json()
    else:  # INT8 of a random tiny model is judged, not required to pass (see test_check_parity)
        assert all(h.metrics["mean_abs"] is not None for h in report.heads)


@pytest.mark.tensorrt
@pytest.mark.skipif(UNUSABLE is not None, reason=f"TensorRT cannot run here: {UNUSABLE}")
def test_engine_from_another_model_version_is_rebuilt_not_loaded(tiny_model: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_model)
    config = TensorRTConfig(require_parity=False, build_if_missing=True)
    open_tensorrt(manifest, config).close()
    other = tiny_conv.build(tmp_path / "other", seed=7)
    shutil.copy(other.parent / "model.onnx", tiny_model.parent / "model.onnx")
    shutil.copy(other, tiny_model)
    manifest = load_manifest(tiny_model)
    with pytest.raises(EngineMismatch):
        find_engine(
            manifest.folder / "cache", plan_engine(manifest, config, current_device()).spec, current_device()
        )
    rebuilt = open_tensorrt(manifest, config)
    assert rebuilt.model_sha256 == manifest.onnx[Precision.fp32].sha256
    rebuilt.close()


def test_a_calibration_cache_keeps_the_id_of_the_images_it_came_from(tmp_path: Path) -> None:
    """Found by a review: an INT8 engine rebuilt from an existing calibration cache recorded no
    calibration id. The id now lies beside the cache (written whole), and a rebuild reads it there."""
    from appliance.backends.tensorrt.build import store_calibration_id, stored_calibration_id

    cache = tmp_path / "cache" / "model.int8.calib"
    cache.parent.mkdir()
    assert stored_calibration_id(cache) is None
    store_calibration_id(cache, "sha256:abc123 (256 images)")
    assert stored_calibration_id(cache) == "sha256:abc123 (256 images)"
    assert sorted(p.name for p in cache.parent.iterdir()) == ["model.int8.calib.id"]  # no temp file left
