from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.interpret.sequence_risk import probability
from appliance.manifest import load_manifest
from tools.training import train_sequence_risk as tool
from tools.training.sequence_risk_model import FEATURES, fit

MODEL = Path(__file__).resolve().parents[2] / "engines" / "cxr-lite0"


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """The bundled model's manifest and split in a scratch folder (ONNX linked, not copied)."""
    if not (MODEL / "manifest.yaml").is_file():
        pytest.skip("engines/cxr-lite0 is not built")
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("manifest.yaml", "split.json"):
        shutil.copy(MODEL / name, folder / name)
    (folder / "model.onnx").symlink_to(MODEL / "model.onnx")
    return folder


def test_smoke_run_writes_reports_and_a_disabled_model(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool.main(["--model", str(model_copy), "--smoke", "6"]) == 0
    report = json.loads((model_copy / "sequence_risk_report.json").read_text())
    assert report["smoke"] == 6
    assert report["data"]["train"]["patients"] == 6
    assert report["data"]["train"]["pairs"] > 0
    assert report["decision"]["enabled"] is False
    assert "validation" in capsys.readouterr().out
    assert (model_copy / "sequence_risk_report.md").read_text().startswith("# Sequence-aware")
    manifest = load_manifest(model_copy)
    assert manifest.sequence_risk is not None and not manifest.sequence_risk.enabled
    assert manifest.sequence_risk.features == FEATURES
    assert manifest.onnx == load_manifest(MODEL).onnx  # the rest of the manifest is kept
    assert (model_copy / "manifest.yaml").read_text().startswith("#")
    # The training side's numbers for real pairs come back from the written manifest.
    for check in report["parity_checks"]:
        assert 0.0 <= check["probability"] <= 1.0
    # A second smoke run may replace a smoke run ...
    assert tool.main(["--model", str(model_copy), "--smoke", "6"]) == 0


def test_smoke_run_refuses_to_replace_a_full_run(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_copy / "sequence_risk_report.json").write_text(json.dumps({"smoke": None}))
    before = (model_copy / "manifest.yaml").read_text()
    assert tool.main(["--model", str(model_copy), "--smoke", "2"]) == 2
    assert "holds a full run" in capsys.readouterr().err
    assert (model_copy / "manifest.yaml").read_text() == before


def test_missing_data_folder_is_a_clear_error(
    model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tool.main(["--model", str(model_copy), "--smoke", "2", "--data", str(tmp_path / "none")]) == 2
    assert "no metadata.csv" in capsys.readouterr().err


def test_fit_recovers_a_known_logistic_model_and_matches_the_appliance_formula() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 2)) * [2.0, 0.5] + [1.0, -1.0]
    truth = 1.0 / (1.0 + np.exp(-(0.8 * x[:, 0] - 2.0 * x[:, 1] + 0.3)))
    y = (rng.random(4000) < truth).astype(float)
    fitted = fit(x, y, lam=0.01)
    slopes = fitted.coefficients / fitted.scale
    assert slopes == pytest.approx([0.8, -2.0], abs=0.2)
    from appliance.manifest import SequenceRisk

    spec = SequenceRisk(
        features=["risk_logit", "extent"],
        mean=list(fitted.mean),
        scale=list(fitted.scale),
        coefficients=list(fitted.coefficients),
        intercept=fitted.intercept,
        threshold=0.5,
    )
    assert probability(x[:50], spec) == pytest.approx(fitted.predict(x[:50]), abs=1e-12)
