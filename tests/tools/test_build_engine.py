"""tools/engines/build_engine.py: dry-run plan/key/trtexec anywhere; plain refusals where TensorRT is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.backends.tensorrt import TensorRTConfig
from appliance.engine_cache import BuildSpec, DeviceIdentity, cache_key, find_engine
from appliance.manifest import Precision, load_manifest
from tests.backends import tiny_conv
from tests.backends.conftest import tensorrt_missing, tensorrt_unusable

REPO = Path(__file__).resolve().parents[2]
TARGET = [
    "--gpu-name",
    "Orin",
    "--compute-capability",
    "8.7",
    "--tensorrt-version",
    "10.3.0",
    "--l4t",
    "R36.4.3",
]
NO_TENSORRT = tensorrt_missing()
UNUSABLE = tensorrt_unusable()


def build_engine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.engines.build_engine", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_conv.build(tmp_path / "tiny")


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here: the dry run would plan for it")
def test_dry_run_prints_plan_key_and_trtexec(model: Path) -> None:
    done = build_engine("--model", str(model), "--max-batch", "8", "--dry-run", *TARGET)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(model)
    # The key printed must be the one the appliance will look for on that device.
    spec = BuildSpec(
        model="tiny-conv",
        onnx_sha256=manifest.onnx[Precision.fp32].sha256,
        precision="fp16",
        input_name="image",
        input_shape=manifest.input.sample_shape,
        opt_batch=1,  # derived: one batch setting, the profile's optimum is always 1
        max_batch=8,
        workspace_mb=TensorRTConfig().workspace_mb,
    )
    device = DeviceIdentity(
        gpu_name="Orin", compute_capability="8.7", tensorrt_version="10.3.0", l4t_release="R36.4.3"
    )
    key = cache_key(spec, device)
    assert f"cache key   {key}" in done.stdout
    assert "note: TensorRT Python package not importable" in done.stdout
    trtexec = next(line for line in done.stdout.splitlines() if line.startswith("trtexec"))
    assert f"--saveEngine={model.parent / 'cache' / f'tiny-conv.fp16.{key[:16]}.engine'}" in trtexec
    assert "--minShapes=image:1x1x64x64 --optShapes=image:1x1x64x64 --maxShapes=image:8x1x64x64" in trtexec
    assert trtexec.endswith("--fp16")
    assert not (model.parent / "cache").exists()  # a dry run writes nothing


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here")
def test_without_tensorrt_building_is_refused_plainly(model: Path) -> None:
    done = build_engine("--model", str(model))
    assert done.returncode == 2
    assert done.stderr.startswith("error: TensorRT is not installed here; ")
    assert "--dry-run" in done.stderr and "Traceback" not in done.stderr


def test_int8_without_qdq_onnx_names_the_missing_file(model: Path) -> None:
    done = build_engine("--model", str(model), "--precision", "int8", "--dry-run", *TARGET)
    assert done.returncode == 2
    assert "has no int8 ONNX" in done.stderr and "tools/engines/quantize.py" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--opt-batch", "8", "--max-batch", "2"], "--opt-batch 8: the engine profile's optimum is always 1"),
        (["--max-batch", "0"], "inference.max_batch 0: an engine needs at least 1"),
        (["--workspace-mb", "1"], "invalid engine settings"),
    ],
)
def test_bad_settings_are_user_errors(model: Path, args: list[str], message: str) -> None:
    done = build_engine("--model", str(model), "--dry-run", *TARGET, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_missing_manifest_is_a_user_error(tmp_path: Path) -> None:
    done = build_engine("--model", str(tmp_path / "nowhere"), "--dry-run", *TARGET)
    assert done.returncode == 2 and "model manifest not found" in done.stderr


@pytest.mark.tensorrt
@pytest.mark.skipif(UNUSABLE is not None, reason=f"TensorRT cannot run here: {UNUSABLE}")
def test_builds_then_is_up_to_date_then_parity_checks(model: Path) -> None:
    first = build_engine("--model", str(model), "--if-needed")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "engine needed" in first.stdout and "build: done in" in first.stdout
    second = build_engine("--model", str(model), "--if-needed")
    assert second.returncode == 0 and "engine up to date" in second.stdout
    checked = build_engine("--model", str(model), "--if-needed", "--check-parity")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "parity PASSED" in checked.stdout
    from appliance.backends.tensorrt import current_device, plan_engine

    manifest = load_manifest(model)
    plan = plan_engine(manifest, TensorRTConfig(), current_device())
    _, record = find_engine(plan.engine_path.parent, plan.spec, current_device())
    assert record.parity is not None and record.parity.passed


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here: the dry run would plan for it")
def test_an_int8_source_the_appliance_does_not_plan_is_said_plainly(model: Path) -> None:
    """TensorRT 10 plans INT8 from the Q/DQ ONNX: an engine calibrated instead is never loaded by the
    appliance, and the build says so before minutes are spent on it."""
    done = build_engine(
        "--model", str(model), "--precision", "int8", "--int8-source", "calibration", "--dry-run", *TARGET
    )
    assert done.returncode == 0, done.stderr
    assert "it will not load this engine" in done.stdout
    plain = build_engine("--model", str(model), "--precision", "fp16", "--dry-run", *TARGET)
    assert plain.returncode == 0 and "will not load" not in plain.stdout
    checked = build_engine(
        "--model", str(model), "--precision", "int8", "--int8-source", "calibration", "--check-parity",
        "--dry-run", *TARGET,
    )  # fmt: skip
    assert checked.returncode == 2 and "would look at another engine" in checked.stderr
