"""tools/quality/bench.py --quick end to end (the CI smoke): real daemon, real Mosquitto, real ONNX Runtime, cart
DICOMs generated from real images. Not a timed test: it checks the report's shape and that every figure
was measured (positive), never a target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.manifest import load_manifest
from tests.backends import tiny_conv
from tools.engines.check_parity import load_inputs
from tools.training import dataset

REPO = Path(__file__).resolve().parents[2]
REQUIRED = [
    "e2e_p95_ms.uncompressed",
    "e2e_p95_ms.j2k",
    "baseline.e2e_p95_ms.uncompressed",
    "throughput_images_per_s",
    "baseline.throughput_images_per_s",
    "throughput_ratio_vs_baseline",
    "peak_rss_mb",
    "startup_to_ready_ms.median",
]
STAGES = ["detect", "read", "decode", "preprocess", "infer", "interpret", "publish"]


def dig(report: dict[str, Any], dotted: str) -> Any:
    value: Any = report
    for key in dotted.split("."):
        assert isinstance(value, dict) and key in value, f"{dotted}: {key} missing"
        value = value[key]
    return value


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("bench")
    model = tiny_conv.build(folder / "tiny")
    calibration, _ = load_inputs(load_manifest(model), dataset.data_dir(None), 16, offset=1)
    tiny_conv.add_fp16(model)
    tiny_conv.add_int8_qdq(model, calibration)
    out = folder / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.quality.bench", "--quick", "--json", str(out), "--model", str(model)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8")), out


def test_required_figures_are_measured(report: tuple[dict[str, Any], Path]) -> None:
    data, _ = report
    for key in REQUIRED:
        value = dig(data, key)
        assert isinstance(value, int | float) and value > 0, (key, value)
    assert data["quick"] is True
    assert set(data["targets"]) >= {"e2e_p95_ms.uncompressed <= 150", "peak_rss_mb <= 400"}
    # The Architecture v2 ratios are computed from this run's own figures (quick: not judged).
    v2 = data["architecture_v2"]
    assert v2["e2e median / stage sum, uncompressed"]["value"] > 0.5
    assert v2["e2e median / stage sum as images arrive, uncompressed"]["value"] > 0.5
    assert v2["peak RSS MB (daemon)"]["value"] == data["peak_rss_mb"]


def test_every_input_has_every_stage(report: tuple[dict[str, Any], Path]) -> None:
    data, _ = report
    assert {"uncompressed", "j2k", "j2k_lossy", "jpeg_baseline", "real_dicom", "real_image"} <= set(
        data["stages_ms"]
    )
    for category, stages in data["stages_ms"].items():
        for stage in STAGES:
            value = stages.get(stage)
            assert isinstance(value, int | float) and value >= 0, (category, stage, value)
        assert stages["decode"] > 0 and stages["infer"] > 0 and stages["publish"] > 0, category
    # The same stages for uncompressed images written and analysed once each, as the e2e images arrive.
    arriving = data["stages_arriving_ms"]["uncompressed"]
    for stage in STAGES:
        assert isinstance(arriving.get(stage), int | float) and arriving[stage] >= 0, (stage, arriving)
    assert arriving["decode"] > 0 and arriving["infer"] > 0 and data["stages_arriving_detail"]["uncompressed"]
    # Every result the daemon sent for the timed files came back from the model, not from an error.
    for category, statuses in data["e2e"]["statuses"].items():
        assert "error" not in statuses, (category, statuses)


def test_precisions_environment_and_markdown(report: tuple[dict[str, Any], Path]) -> None:
    data, out = report
    assert {"fp32", "fp16", "int8"} <= set(data["precisions"])
    assert data["precisions"]["int8"]["vs_fp32"]["triage_agreement"] is not None
    assert "tensorrt" in data["precisions"]
    env = data["environment"]
    assert env["cpu_model"] and env["versions"]["onnxruntime"] and "ort_intra_op_threads" in env["threads"]
    table = out.with_name(out.name + ".md").read_text(encoding="utf-8")
    assert "| e2e p95 ms, uncompressed |" in table and "baseline" in table


def test_sigterm_stops_the_run_and_removes_its_files(tmp_path: Path) -> None:
    """A bench ended by SIGTERM (a timeout, systemd) stops its broker and daemons and leaves none of the
    gigabytes it generated behind: one killed run left 4 GB in /tmp and a later CI run found the disk full."""
    model = tiny_conv.build(tmp_path / "tiny")
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.quality.bench",
            "--quick",
            "--json",
            str(tmp_path / "b.json"),
            "--model",
            str(model),
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    progress = []
    for line in proc.stderr:  # terminated once the daemon end-to-end part runs: broker and daemon are up
        progress.append(line)
        if "daemon end to end" in line:
            break
    else:
        pytest.fail("the bench ended before its daemon part:\n" + "".join(progress[-40:]))
    proc.terminate()
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, rest[-3000:]
    assert "interrupted" in rest
    assert list(workdir.iterdir()) == []
    left = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True, check=False)
    assert left.stdout == "", left.stdout  # no broker or daemon still running from the work folder
