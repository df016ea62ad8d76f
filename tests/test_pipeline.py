"""The Analyzer end to end on real images, with two structurally different models built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.config import AppConfig
from appliance.ingest import read_image
from appliance.manifest import Precision, load_manifest
from appliance.pipeline import Analyzer, Job
from appliance.preprocess import preprocess
from testsupport import data, tiny_models
from testsupport.schemas import assert_valid


def analyzer_for(manifest_path: Path) -> Analyzer:
    manifest = load_manifest(manifest_path)
    backend = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=1), max_batch=4)
    return Analyzer(AppConfig(), manifest, backend)


def jobs(paths: list[Path]) -> list[Job]:
    return [Job(path=p, image_id=f"id{i}", source="test") for i, p in enumerate(paths)]


def test_xrv_like_model_sees_minus_1024_to_1024_nchw(tmp_path: Path) -> None:
    analyzer = analyzer_for(tiny_models.xrv_like(tmp_path / "xrv"))
    images = [data.first(source="txv", view="PA", modality="X-ray"), *data.real_dicoms()[:1]]
    results = analyzer.analyze(jobs(images))
    for path, result in zip(images, results, strict=True):
        assert_valid(result.model_dump(mode="json", by_alias=True), "result.v2.json")
        assert result.status == "ok", result.reason
        assert [f.label for f in result.findings] == ["Atelectasis", "Effusion", "Pneumonia"]
        # The mean the model saw equals the mean of the manifest's preprocessing of the decoded image.
        expected, _ = preprocess(read_image(path, target_size=64).pixels, analyzer.manifest.input)
        logit = 0.004 * float(expected.mean()) + 0.5
        assert result.findings[0].score == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-4)
        assert result.provenance.model == "xrv-like" and result.provenance.backend == "onnxruntime"
        assert result.disclaimer == "Not for diagnostic use"
        assert result.triage in {"normal", "abnormal"}


def test_keras_like_model_nhwc_three_channels_softmax_in_graph(tmp_path: Path) -> None:
    analyzer = analyzer_for(tiny_models.keras_like(tmp_path / "keras"))
    image = data.first(source="cohen", view="PA", modality="X-ray", finding="COVID-19")
    (result,) = analyzer.analyze(jobs([image]))
    assert result.status == "ok"
    scores = {f.label: f.score for f in result.findings}
    # "No finding" is a decision of the reading (decisions.py), never a published finding of its own.
    assert "normal" not in scores
    tensor, _ = preprocess(read_image(image, target_size=48).pixels, analyzer.manifest.input)
    mean = float(tensor.mean())
    expected_normal = 1 / (1 + np.exp(-(3.5 * mean - -3.5 * mean)))
    assert scores["pneumonia"] == pytest.approx(1 - expected_normal, abs=1e-3)
    # no abnormal head: the abnormal score is 1 - P(normal)
    assert result.abnormal is not None and result.abnormal.score == pytest.approx(
        1 - expected_normal, abs=1e-3
    )


def test_bad_files_become_error_results_and_the_rest_still_run(tmp_path: Path) -> None:
    analyzer = analyzer_for(tiny_models.xrv_like(tmp_path / "xrv"))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.dcm"
    text.write_text("this is not an image\n" * 10)
    good = data.real_dicoms()[0]
    results = analyzer.analyze(jobs([empty, text, good]))
    assert [r.status for r in results] == ["error", "error", "ok"]
    assert results[0].reason and results[1].reason and results[0].reason != results[1].reason
    for result in results[:2]:
        assert result.text.startswith("Not read:") and result.triage is None


def test_message_id_is_stable_for_the_same_image_and_model(tmp_path: Path) -> None:
    analyzer = analyzer_for(tiny_models.xrv_like(tmp_path / "xrv"))
    image = data.real_dicoms()[0]
    first = analyzer.analyze(jobs([image]))[0]
    again = analyzer.analyze(jobs([image]))[0]
    assert first.message_id == again.message_id
