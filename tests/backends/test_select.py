"""Backend selection: auto falls back to ONNX Runtime loudly, an explicit `tensorrt` fails plainly."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from appliance.backends.onnxruntime import OnnxRuntimeBackend
from appliance.backends.select import TensorRTRequired, create_backend, parity_refusal
from appliance.backends.tensorrt import TensorRTConfig
from appliance.config import InferenceConfig
from appliance.engine_cache import EngineRecord, ParityRecord
from appliance.errors import UserError
from appliance.ingest import read_image
from appliance.manifest import load_manifest
from appliance.preprocess import preprocess
from tests.backends.conftest import tensorrt_missing
from tests.backends.engine_records import ORIN, SPEC
from testsupport.data import first

NO_TENSORRT = tensorrt_missing()
needs_no_tensorrt = pytest.mark.skipif(
    NO_TENSORRT is None, reason="TensorRT is installed here: the no-TensorRT fallback cannot happen"
)


@needs_no_tensorrt
def test_auto_without_tensorrt_falls_back_to_onnxruntime(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = load_manifest(tiny_model)
    with caplog.at_level(logging.WARNING, logger="appliance.backends.select"):
        backend = create_backend(manifest, InferenceConfig(model=tiny_model, backend="auto"))
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.fallback_reason is not None
    assert backend.fallback_reason.startswith("TensorRT not used: TensorRT Python package not importable")
    assert any(
        "FALLBACK to ONNX Runtime" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    # The stand-in really runs: a real chest X-ray through the appliance's own preprocessing.
    image = read_image(first(source="txv", modality="X-ray"))
    batch = preprocess(image.pixels, manifest.input)[0][None]
    outputs = backend.run(batch)
    assert set(outputs) == {o.name for o in manifest.outputs}
    assert outputs["heatmap"].shape == (1, 16, 16)
    assert np.isfinite(outputs["severity"]).all()


@needs_no_tensorrt
def test_explicit_tensorrt_without_tensorrt_is_a_plain_error(tiny_model: Path) -> None:
    manifest = load_manifest(tiny_model)
    with pytest.raises(TensorRTRequired) as caught:
        create_backend(manifest, InferenceConfig(model=tiny_model, backend="tensorrt"))
    assert isinstance(caught.value, UserError)  # shown without a traceback
    message = str(caught.value)
    assert "inference.backend is 'tensorrt' but TensorRT cannot be used here" in message
    assert "TensorRT Python package not importable" in message
    assert "inference.backend: auto" in message


def test_onnxruntime_requested_has_no_fallback_reason(tiny_model: Path) -> None:
    backend = create_backend(
        load_manifest(tiny_model), InferenceConfig(model=tiny_model, backend="onnxruntime")
    )
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.fallback_reason is None
    assert (backend.name, backend.precision) == ("onnxruntime", "fp32")


def _record(parity: ParityRecord | None) -> EngineRecord:
    return EngineRecord(
        key="k" * 64,
        spec=SPEC,
        device=ORIN,
        engine_file="x.engine",
        engine_sha256="e" * 64,
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=1.0,
        parity=parity,
    )


def test_parity_gate_decides_which_matching_engines_may_run() -> None:
    strict, lax = TensorRTConfig(), TensorRTConfig(require_parity=False)
    passed = ParityRecord(passed=True, checked_at="2026-01-01T00:00:00+00:00", images=200)
    failed = passed.model_copy(update={"passed": False, "report": "/x/parity.json"})
    assert "has not passed the parity check yet" in (parity_refusal(_record(None), strict) or "")
    assert "FAILED the parity check" in (parity_refusal(_record(failed), strict) or "")
    assert "/x/parity.json" in (parity_refusal(_record(failed), strict) or "")
    assert parity_refusal(_record(passed), strict) is None
    assert parity_refusal(_record(None), lax) is None
