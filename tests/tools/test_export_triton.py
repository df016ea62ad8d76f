"""tools/engines/export_triton.py: repository layout, config.pbtxt parsed back with Triton's own proto, refusals.

config.pbtxt is parsed with google.protobuf.text_format into tritonclient's ModelConfig (the
message tritonserver itself reads), so an unknown field or bad syntax fails here as it would there.
Dims are checked against what ONNX Runtime really outputs, not against the exporter's own reading.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.engine_cache import BuildSpec, DeviceIdentity, ParityRecord, record_parity, store_engine
from appliance.manifest import Manifest, Precision, load_manifest, sha256_file
from tests.backends import tiny_conv
from tools.engines import export_triton

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="tritonclient[grpc] not installed (Triton's ModelConfig proto)",
)

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "engines" / "cxr-lite0" / "manifest.yaml"


def export(*args: str) -> int:
    return export_triton.main(list(args))


def parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def real_output_shapes(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """Per-sample output shapes as ONNX Runtime computes them on a batch of 2."""
    backend = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig())
    outputs = backend.run(np.zeros((2, *manifest.input.sample_shape), np.float32))
    backend.close()
    return {name: value.shape[1:] for name, value in outputs.items()}


def params(config: Any) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_bundled_model_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = load_manifest(BUNDLED)
    assert export("--model", str(BUNDLED), "--out", str(tmp_path)) == 0
    model_dir = tmp_path / "cxr-lite0"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["manifest.yaml", "model.onnx"]
    assert sha256_file(model_dir / "1" / "model.onnx") == manifest.onnx[Precision.fp32].sha256
    assert (model_dir / "1" / "manifest.yaml").read_bytes() == BUNDLED.read_bytes()

    config = parse_config(model_dir / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("cxr-lite0", "onnxruntime_onnx", 8)
    assert config.default_model_filename == "model.onnx"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("image", model_config_pb2.DataType.TYPE_FP32, [1, 256, 256])
    ]
    graph = onnx.load(str(model_dir / "1" / "model.onnx"), load_external_data=False)
    assert [o.name for o in config.output] == [o.name for o in graph.graph.output]
    assert {o.name for o in manifest.outputs} <= {o.name for o in config.output}
    shapes = real_output_shapes(manifest)
    for output in config.output:
        assert output.data_type == model_config_pb2.DataType.TYPE_FP32
        # Shape inference resolved the heatmap/lung mask axes the exporter left symbolic.
        assert tuple(output.dims) == shapes[output.name], output.name
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU)
    ]
    assert params(config) == {
        "manifest_name": "cxr-lite0",
        "manifest_version": manifest.version,
        "model_sha256": manifest.onnx[Precision.fp32].sha256,
        "precision": "fp32",
        "onnx_precision": "fp32",
    }
    out = capsys.readouterr().out
    assert "heatmap: TYPE_FP32 [64, 64]" in out
    assert f"tritonserver --model-repository {tmp_path.resolve()}" in out


def test_tiny_model_with_options(tmp_path: Path) -> None:
    manifest_path = tiny_conv.build(tmp_path / "tiny")
    out = tmp_path / "repo"
    argv = ["--model", str(manifest_path), "--out", str(out), "--name", "tiny", "--version", "3"]
    argv += ["--max-batch", "4", "--preferred-batch", "4,2", "--max-queue-delay-us", "2000"]
    assert export(*argv, "--instances", "2", "--kind", "KIND_CPU") == 0
    config = parse_config(out / "tiny" / "config.pbtxt")
    assert (config.name, config.max_batch_size) == ("tiny", 4)
    assert (out / "tiny" / "3" / "model.onnx").is_file()
    shapes = real_output_shapes(load_manifest(manifest_path))
    assert {o.name: tuple(o.dims) for o in config.output} == shapes
    assert shapes["heatmap"] == (16, 16)
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.Kind.KIND_CPU)
    ]


def test_existing_version_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_path = tiny_conv.build(tmp_path / "tiny")
    out = tmp_path / "repo"
    assert export("--model", str(manifest_path), "--out", str(out)) == 0
    assert export("--model", str(manifest_path), "--out", str(out), "--max-batch", "2") == 2
    assert "already exists; give --force" in capsys.readouterr().err
    assert parse_config(out / "tiny-conv" / "config.pbtxt").max_batch_size == 8  # untouched
    assert export("--model", str(manifest_path), "--out", str(out), "--max-batch", "2", "--force") == 0
    assert parse_config(out / "tiny-conv" / "config.pbtxt").max_batch_size == 2
    assert not [p for p in (out / "tiny-conv").iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    ("change", "argv", "message"),
    [
        ("onnx", [], "does not match the manifest's"),
        (None, ["--precision", "int8"], "has no int8 ONNX"),
        (None, ["--preferred-batch", "16"], "sizes must lie in 1..8"),
        (None, ["--preferred-batch", "two"], "give comma-separated integers"),
        (None, ["--instances", "0"], "--instances must be >= 1"),
        (None, ["--plan", "missing.engine"], "TensorRT engine not found"),
        ("fixed-batch", [], "fixed batch axis of 1"),
    ],
)
def test_refusals_are_plain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: str | None, argv: list[str], message: str
) -> None:
    manifest_path = tiny_conv.build(tmp_path / "tiny")
    onnx_path = manifest_path.parent / "model.onnx"
    if change == "onnx":
        onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    if change == "fixed-batch":
        model = onnx.load(str(onnx_path))
        for value in [*model.graph.input, *model.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_value = 1
        onnx.save(model, str(onnx_path))
        data = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
        data["onnx"]["fp32"]["sha256"] = sha256_file(onnx_path)
        manifest_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "repo"
    assert export("--model", str(manifest_path), "--out", str(out), *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert not (out / "tiny-conv" / "config.pbtxt").exists()


# --- --plan: the exporter reads the engine cache's sidecar and copies the engine's bytes unread.
# The bytes below are a stand-in (no TensorRT here); nothing claims they would run.


@pytest.fixture
def cached_engine(tmp_path: Path) -> tuple[Path, Path]:
    manifest_path = tiny_conv.build(tmp_path / "tiny")
    manifest = load_manifest(manifest_path)
    spec = BuildSpec(
        model=manifest.name,
        onnx_sha256=manifest.onnx[Precision.fp32].sha256,
        precision="fp16",
        input_name="image",
        input_shape=manifest.input.sample_shape,
        opt_batch=2,
        max_batch=4,
        workspace_mb=1024,
    )
    device = DeviceIdentity(gpu_name="NVIDIA H100", compute_capability="9.0", tensorrt_version="10.3.0")
    cache = tmp_path / "cache"
    record = store_engine(cache, spec, device, b"stand-in engine bytes", 1.0)
    return manifest_path, cache / record.engine_file


def _pass_parity(engine: Path, passed: bool) -> None:
    record_parity(
        engine.with_suffix(".json"), ParityRecord(passed=passed, checked_at="2026-01-01", images=64)
    )


def test_plan_repository(tmp_path: Path, cached_engine: tuple[Path, Path]) -> None:
    manifest_path, engine = cached_engine
    _pass_parity(engine, passed=True)
    out = tmp_path / "repo"
    assert export("--model", str(manifest_path), "--out", str(out), "--plan", str(engine)) == 0
    version = out / "tiny-conv" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["manifest.yaml", "model.plan"]
    assert version.joinpath("model.plan").read_bytes() == engine.read_bytes()
    config = parse_config(out / "tiny-conv" / "config.pbtxt")
    assert (config.platform, config.default_model_filename, config.max_batch_size) == (
        "tensorrt_plan",
        "model.plan",
        4,  # the engine's optimisation profile max
    )
    values = params(config)
    assert values["precision"] == "fp16" and values["onnx_precision"] == "fp32"
    assert values["model_sha256"] == load_manifest(manifest_path).onnx[Precision.fp32].sha256
    assert values["engine_sha256"] == sha256_file(engine)
    assert (values["gpu_name"], values["tensorrt_version"]) == ("NVIDIA H100", "10.3.0")


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ("unchecked", [], "has not passed tools/engines/check_parity.py yet"),
        ("failed", [], "FAILED the parity check"),
        ("passed", ["--max-batch", "8"], "allows 1..4"),
        ("passed", ["--kind", "KIND_CPU"], "runs on a GPU only"),
        ("passed", ["--precision", "fp32"], "a --plan has the precision it was built with"),
        ("damaged", [], "does not match its sidecar"),
        ("other-onnx", [], "rebuild it with tools/engines/build_engine.py"),
    ],
)
def test_plan_refusals(
    tmp_path: Path,
    cached_engine: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    setup: str,
    argv: list[str],
    message: str,
) -> None:
    manifest_path, engine = cached_engine
    if setup in ("passed", "failed", "damaged", "other-onnx"):
        _pass_parity(engine, passed=setup != "failed")
    if setup == "damaged":
        engine.write_bytes(engine.read_bytes() + b"x")
    if setup == "other-onnx":  # the manifest now names another ONNX than the engine was built from
        other = tiny_conv.build(tmp_path / "other", seed=7)
        shutil.copyfile(other.parent / "model.onnx", manifest_path.parent / "model.onnx")
        shutil.copyfile(other, manifest_path)
    out = tmp_path / "repo"
    assert export("--model", str(manifest_path), "--out", str(out), "--plan", str(engine), *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_command_line(tmp_path: Path) -> None:
    """The tool runs as documented (`python -m tools.engines.export_triton`, exit code, progress on stdout)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.engines.export_triton",
            "--model",
            str(BUNDLED),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "copying" in done.stdout and "wrote" in done.stdout
    assert (tmp_path / "cxr-lite0" / "config.pbtxt").is_file()
