"""The bundled model's readings of every validation image, through the real Analyzer and ONNX Runtime:
no result contradicts itself, and only published outputs appear in it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.interpret.decisions import audit_result
from appliance.manifest import Role, load_manifest
from testsupport.data import cxr_data, rows
from tools.training.evaluate_images import analyze, make_analyzer

COMMITTED = Path(__file__).resolve().parents[2] / "engines" / "cxr-lite0"


@pytest.mark.slow
def test_no_validation_reading_contradicts_itself() -> None:
    manifest = load_manifest(COMMITTED)
    validation = set(json.loads((COMMITTED / "split.json").read_text())["validation"])
    files = [cxr_data() / r["file"] for r in rows() if r["patient_id"] in validation]
    assert len(files) > 1000, "the validation split should hold the whole validation set"
    results = analyze(make_analyzer(COMMITTED, "fp32", 2), files, "validation readings")
    findings = manifest.output(Role.findings)
    assert findings is not None
    published = {label for label in findings.labels if findings.is_published(label)}
    problems = []
    for path, result in zip(files, results, strict=True):
        found = audit_result(result)
        problems += [f"{path.name}: {p}" for p in found]
        assert {f.label for f in result.findings} <= published, path.name
        assert result.text.endswith("Not for diagnostic use.")
    assert problems == [], problems[:10]
    accepted = [r for r in results if r.status == "ok"]
    assert len(accepted) > 0.9 * len(results)
    assert {r.triage for r in accepted} >= {"normal", "abnormal"}
