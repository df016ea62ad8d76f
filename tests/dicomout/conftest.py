"""Results of the real pipeline (tiny ONNX model, real ONNX Runtime) for the three real DICOMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import AppConfig
from appliance.interpret.reading import heatmap_png
from appliance.result import Result, Risk, Score, Severity
from appliance.runtime import build_analyzer, job_for_file
from tests.support import tiny_models
from tests.support.data import real_dicoms


def with_everything(result: Result) -> Result:
    """The tiny model has no heatmap/severity/risk heads: add them, so every SR/SC branch is used."""
    yy, xx = np.mgrid[0:80, 0:64]
    heat = np.exp(-(((xx - 18) / 8.0) ** 2 + ((yy - 38) / 12.0) ** 2))  # patient's right mid zone
    return result.model_copy(
        update={
            "heatmap": heatmap_png(heat, "abnormal"),
            "severity": Severity(extent=3.5, opacity=2.0),
            "risk": Risk(score=0.42, threshold=0.5, positive=False),
            "abnormal": Score(score=0.81, threshold=0.5, positive=True),
            "triage": "abnormal",
        }
    )


@pytest.fixture(scope="session")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Result, Path]]:
    folder = tmp_path_factory.mktemp("analyzer")
    config = AppConfig.model_validate(
        {
            "inference": {"model": str(tiny_models.xrv_like(folder / "model")), "backend": "onnxruntime"},
            "privacy": {"salt_file": str(folder / "salt")},
            "mqtt": {"enabled": False},
        }
    )
    analyzer = build_analyzer(config)
    try:
        paths = real_dicoms()
        results = analyzer.analyze([job_for_file(p, "dicom-net") for p in paths])
    finally:
        analyzer.backend.close()
    assert [r.status for r in results] == ["ok"] * len(paths), [r.reason for r in results]
    return [(with_everything(r), p) for r, p in zip(results, paths, strict=True)]
