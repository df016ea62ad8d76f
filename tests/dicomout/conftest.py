"""Results of the real pipeline (tiny ONNX model, real ONNX Runtime) for the three real DICOMs, and the
DICOM jobs rendered from them (the pixels as the analyzer decoded them, the full float heatmap)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from appliance.assemble import build_analyzer, job_for_file
from appliance.config import AppConfig
from appliance.dicomout import DicomJob
from appliance.interpret.reading import heatmap_png
from appliance.result import Result, Risk, Score, Severity
from testsupport import tiny_models
from testsupport.data import real_dicoms

_yy, _xx = np.mgrid[0:80, 0:64]
HEAT = np.exp(-(((_xx - 18) / 8.0) ** 2 + ((_yy - 38) / 12.0) ** 2))  # patient's right mid zone
MakeJob = Callable[[Result, Path], DicomJob]


def with_everything(result: Result) -> Result:
    """The tiny model has no heatmap/severity/risk heads: add them, so every SR/SC branch is used."""
    return result.model_copy(
        update={
            "heatmap": heatmap_png(HEAT, "abnormal"),
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
        jobs = [job_for_file(p, "dicom-net") for p in paths]
        results = analyzer.analyze(jobs)
    finally:
        analyzer.backend.close()
    assert [r.status for r in results] == ["ok"] * len(paths), [r.reason for r in results]
    for job, result in zip(jobs, results, strict=True):
        assert job.image is not None
        _decoded[result.image.image_id] = job.image.pixels
    return [(with_everything(r), p) for r, p in zip(results, paths, strict=True)]


_decoded: dict[str, np.ndarray] = {}  # image id -> the pixels the analyzer decoded


@pytest.fixture
def dicom_job(analyzed: list[tuple[Result, Path]]) -> MakeJob:
    """The job the processor files for a result of `analyzed` (or a copy of one) and its source."""

    def make(result: Result, source_path: Path) -> DicomJob:
        pixels = _decoded[result.image.image_id]
        return DicomJob(result, source_path, source_path.name, pixels, HEAT, "abnormal")

    return make
