"""The model tools end to end on real images: smoke training -> export -> quantise + gate -> evaluate.

Also checks the committed engines/cxr-lite0 model: hashes, a real frontal X-ray scored frontal and
accepted, CT slices refused. The tools run as subprocesses, exactly as a user runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.ingest import read_image
from appliance.interpret.activation import activate
from appliance.manifest import Precision, Role, load_manifest
from appliance.preprocess import preprocess
from testsupport.data import cxr_data, rows
from tools.training import evaluate
from tools.training.dataset import FINDING_LABELS

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "engines" / "cxr-lite0"
EVAL_KEYS = evaluate.KEYS


def tool(module: str, *args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CXR_DATA": str(cxr_data())}
    done = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode in ok, (
        f"{module} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cxr-smoke")
    tool("tools.training.train", "--smoke", "--out", out)
    tool("tools.training.export_onnx", "--out", out, "--compare-images", "4")
    return out


def test_smoke_training_writes_split_and_checkpoint(smoke_model: Path) -> None:
    split = json.loads((smoke_model / "split.json").read_text())
    assert split["train"] and split["validation"]
    assert not set(split["train"]) & set(split["validation"]), "a patient is on both sides of the split"
    assert (smoke_model / "checkpoints" / "model.pt").is_file()
    assert (smoke_model / "checkpoints" / "last.pt").is_file(), "no epoch checkpoint to resume from"


def test_manifest_publishes_only_what_validation_passed(smoke_model: Path) -> None:
    manifest = load_manifest(smoke_model)
    validation = json.loads((smoke_model / "checkpoints" / "validation.json").read_text())
    findings = manifest.output(Role.findings)
    assert findings is not None and findings.published is not None
    for label in FINDING_LABELS:
        assert (label in findings.published) == validation[f"findings.{label}"]["published"], label
    heart = manifest.output(Role.heart_mask)
    assert heart is not None
    assert (heart.published == ["cardiothoracic_ratio"]) == validation["cardiothoracic_ratio"]["published"]


def test_training_resumes_from_its_epoch_checkpoint(tmp_path: Path) -> None:
    """Stopped after its first epoch, a second run picks up from there instead of starting again."""
    args = ("--epochs", "2", "--out", tmp_path)
    first = tool("tools.training.train", "--smoke", *args, "--stop-after-epoch", "1")
    assert "stopping after epoch 1" in first.stdout
    second = tool("tools.training.train", "--smoke", *args)
    assert "resuming after epoch 1" in second.stdout
    assert "epoch 2:" in second.stdout and "epoch 1:" not in second.stdout


def test_export_gives_one_checked_graph_matching_torch(smoke_model: Path) -> None:
    model = onnx.load(str(smoke_model / "model.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = model.graph.input
    assert graph_input.name == "image"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param, "batch axis must be dynamic"
    manifest = load_manifest(smoke_model)
    assert {o.name for o in manifest.outputs} <= {o.name for o in model.graph.output}
    manifest.verify_file(Precision.fp32)
    report = json.loads((smoke_model / "export_report.json").read_text())
    assert set(report["max_abs_diff"]) == {o.name for o in manifest.outputs}
    assert report["max_abs_diff"]["view_logits"] < 1e-3


def test_output_shapes_on_a_batch_of_two(smoke_model: Path) -> None:
    manifest = load_manifest(smoke_model)
    backend = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=2))
    image = read_image(cxr_data() / rows(view="PA", modality="X-ray")[0]["file"])
    tensor, _ = preprocess(image.pixels, manifest.input)
    out = backend.run(np.stack([tensor, tensor]))
    expected = {
        "view_logits": (2, 3),
        "finding_logits": (2, len(FINDING_LABELS)),
        "abnormal_logit": (2, 1),
        "severity": (2, 2),
        "risk_logit": (2, 1),
        "ood_score": (2, 1),
        "embedding": (2, 1280),
    }
    for name, shape in expected.items():
        assert out[name].shape == shape, name
    assert out["heatmap"].shape[0] == 2 and out["heatmap"].ndim == 3
    assert out["heatmap"].min() >= 0.0 and out["heatmap"].max() <= 1.0 + 1e-5
    assert out["lung_mask"].shape == out["heatmap"].shape
    assert out["heart_mask"].shape == out["heatmap"].shape


def test_quantize_gate_and_evaluate(smoke_model: Path, tmp_path: Path) -> None:
    # A one-step smoke model may or may not pass the gate (exit 0 or 1); the manifest must agree with the reports.
    tool(
        "tools.engines.quantize",
        "--model",
        smoke_model,
        "--limit",
        "8",
        "--calibration-images",
        "8",
        ok=(0, 1),
    )
    manifest = load_manifest(smoke_model)
    for precision in ("int8", "fp16"):
        report = json.loads((smoke_model / f"parity_{precision}.json").read_text())
        assert (smoke_model / f"parity_{precision}.md").is_file()
        assert report["checks"] and all("ok" in c for c in report["checks"])
        listed = Precision(precision) in manifest.onnx
        assert listed == report["passed"], f"{precision}: manifest listing disagrees with its gate"
        if listed:
            assert manifest.onnx[Precision(precision)].gate == f"parity_{precision}.md"
            manifest.verify_file(Precision(precision))
    int8 = onnx.load(str(smoke_model / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node), "INT8 must be explicit Q/DQ"

    out = tmp_path / "eval.json"
    tool(
        "tools.training.evaluate",
        "--model",
        smoke_model / "manifest.yaml",
        "--split",
        "all",
        "--limit",
        "30",
        "--generated",
        "6",
        "--json",
        out,
    )
    result = json.loads(out.read_text())
    for key in EVAL_KEYS:
        assert key in result and f"{key}_ci" in result, key
    assert result["n_images"] > 0
    assert 0.0 <= result["view.accuracy"] <= 1.0
    lo, hi = result["view.accuracy_ci"]
    assert lo <= hi
    assert result["detail"]["non_medical"]["generated_n"] == 6


def test_bad_checkpoint_is_a_plain_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.pt").write_bytes(b"not a checkpoint")
    done = tool("tools.training.export_onnx", "--out", tmp_path, ok=(2,))
    assert "error:" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def committed() -> OnnxRuntimeBackend:
    if not (COMMITTED / "manifest.yaml").is_file():
        pytest.skip("engines/cxr-lite0 has not been trained and committed yet")
    manifest = load_manifest(COMMITTED)
    return OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=2))


def _scores(backend: OnnxRuntimeBackend, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    manifest = load_manifest(COMMITTED)
    size = max(manifest.input.height, manifest.input.width)  # the pipeline's reduced-size JPEG decode
    tensors = [
        preprocess(read_image(cxr_data() / f, target_size=size).pixels, manifest.input)[0] for f in files
    ]
    out = backend.run(np.stack(tensors))
    view = manifest.output(Role.view)
    ood = manifest.output(Role.ood)
    assert view is not None and ood is not None
    return activate(view, out[view.name]).argmax(1), out[ood.name][:, 0] > ood.thresholds["ood"]


def test_committed_model_hashes_match(committed: OnnxRuntimeBackend) -> None:
    manifest = load_manifest(COMMITTED)
    for precision in manifest.onnx:
        manifest.verify_file(precision)
    assert (COMMITTED / "split.json").is_file() and (COMMITTED / "MODEL_CARD.md").is_file()


def test_committed_model_accepts_frontal_validation_xrays(committed: OnnxRuntimeBackend) -> None:
    validation = set(json.loads((COMMITTED / "split.json").read_text())["validation"])
    files = [
        r["file"] for r in rows(view="PA", modality="X-ray", source="cohen") if r["patient_id"] in validation
    ]
    view, out_of_distribution = _scores(committed, files[:6])
    accepted = (view == 0) & ~out_of_distribution
    assert accepted.sum() >= 5, (
        f"frontal validation X-rays refused: {[f for f, a in zip(files, accepted, strict=True) if not a]}"
    )


def test_committed_model_refuses_ct_slices(committed: OnnxRuntimeBackend) -> None:
    files = [r["file"] for r in rows(modality="CT")]
    view, out_of_distribution = _scores(committed, files)
    refused = (view != 0) | out_of_distribution
    assert refused.mean() >= 0.9, (
        f"CT slices accepted as chest X-rays: {[f for f, r in zip(files, refused, strict=True) if not r]}"
    )
