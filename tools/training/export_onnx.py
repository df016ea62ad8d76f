"""Checkpoint -> one ONNX graph (opset 17, dynamic batch) + manifest.yaml, checked against torch.

    .venv/bin/cxr-export-onnx --out engines/cxr-lite0 [--checkpoint PATH]

Runs onnx.checker, compares every output of ONNX Runtime with torch on real validation images and
random inputs (max abs diff per output, written to export_report.json), and writes the fp32 sha256
into the manifest. Quantised entries are dropped: they must be re-gated by tools/engines/quantize.py.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml

from appliance.errors import UserError
from appliance.manifest import load_manifest, sha256_file
from tools.training import dataset as data
from tools.training.dataset import FINDING_LABELS
from tools.training.model import (
    OUTPUT_NAMES,
    SEVERITY_LABELS,
    SEVERITY_MAX,
    CxrLite0,
    ExportWrapper,
)

OPSET = 17
NAME = "cxr-lite0"
# Tolerance for fp32 ONNX vs torch (same arithmetic, different kernels), relative to values above 1.
EXPORT_TOLERANCE = 1e-3


def load_checkpoint(path: Path) -> tuple[CxrLite0, dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (run tools/training/train.py first)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
        model = CxrLite0()
        model.load_state_dict(content["state_dict"])
    except (OSError, KeyError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"{path}: not a cxr-lite0 checkpoint: {exc}") from exc
    model.eval()
    return model, content


def export(model: CxrLite0, path: Path) -> None:
    dummy = torch.zeros(2, data.INPUT_SPEC.channels, data.INPUT_SPEC.height, data.INPUT_SPEC.width)
    torch.onnx.export(
        ExportWrapper(model).eval(),  # export restores the wrapper's mode onto the model afterwards
        (dummy,),
        str(path),
        dynamo=False,  # the TorchScript exporter needs no onnxscript and gives plain, TensorRT-friendly ops
        input_names=[data.INPUT_SPEC.name],
        output_names=OUTPUT_NAMES,
        dynamic_axes={name: {0: "batch"} for name in [data.INPUT_SPEC.name, *OUTPUT_NAMES]},
        opset_version=OPSET,
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def sample_inputs(folder: Path | None, count: int, seed: int) -> np.ndarray:
    """Real validation images through the appliance preprocessing, else seeded random tensors."""
    tensors: list[np.ndarray] = []
    if folder is not None:
        records = [r for r in data.load_records(folder) if not r.is_dicom]
        tensors = [
            data.tensor(data.read_pixels(folder / r.file)) for r in records[:: max(1, len(records) // count)]
        ]
    rng = np.random.default_rng(seed)
    spec = data.INPUT_SPEC
    tensors += [
        rng.uniform(-1, 1, (spec.channels, spec.height, spec.width)).astype(np.float32) for _ in range(2)
    ]
    return np.stack(tensors[: count + 2])


def compare(
    model: CxrLite0, onnx_path: Path, inputs: np.ndarray
) -> tuple[dict[str, float], dict[str, float]]:
    """Max |onnx - torch| per output, and the largest |torch| value of that output (for a relative check:
    the OOD distance of an under-fitted smoke model can be in the thousands)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(OUTPUT_NAMES, {data.INPUT_SPEC.name: inputs})
    with torch.no_grad():
        want = [w.numpy() for w in ExportWrapper(model).eval()(torch.from_numpy(inputs))]
    diffs = {name: float(np.abs(g - w).max()) for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True)}
    return diffs, {name: float(np.abs(w).max()) for name, w in zip(OUTPUT_NAMES, want, strict=True)}


NOT_ASSESSED = ["pneumothorax", "fractures", "lines and tubes"]  # never in the training labels


def published(validation: dict[str, Any], key: str) -> bool:
    return bool(validation.get(key, {}).get("published", False))


def manifest_dict(
    points: dict[str, float],
    training: dict[str, Any],
    onnx_entries: dict[str, Any],
    validation: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a trained checkpoint: operating points and, per output, the labels whose
    validation cleared the publication bar (tools/training/readouts.py)."""
    spec = data.INPUT_SPEC
    findings = [label for label in FINDING_LABELS if published(validation, f"findings.{label}")]
    severity = [label for label in SEVERITY_LABELS if published(validation, f"severity.{label}")]
    risk_ok = published(validation, "risk") and "risk" in points
    return {
        "schema_version": 1,
        "name": NAME,
        "version": "2.0.0",
        "description": (
            "EfficientNet-Lite0 (ImageNet init) fine-tuned on ~5,900 public chest X-rays (NIH, JSRT, COVID-19"
            " Radiography Database, Cohen, Hannover, ...): view gate, not-a-CXR refusal, multi-label findings,"
            " abnormal triage, severity and risk read-outs, heatmap, lung and heart masks."
        ),
        "intended_use": "Research demonstration. Not for diagnostic use. Weights derive from research-only data.",
        "onnx": onnx_entries,
        "input": spec.model_dump(mode="json"),
        "outputs": [
            {
                "name": "view_logits",
                "role": "view",
                "activation": "softmax",
                "labels": ["frontal", "lateral", "not_cxr"],
                "refuse_labels": {"lateral": "lateral view", "not_cxr": "not a chest X-ray"},
            },
            {
                "name": "finding_logits",
                "role": "findings",
                "activation": "sigmoid",
                "labels": FINDING_LABELS,
                "thresholds": {
                    label: round(points[f"finding.{label}"], 4)
                    for label in FINDING_LABELS
                    if f"finding.{label}" in points
                },
                "published": findings,
            },
            {
                "name": "abnormal_logit",
                "role": "abnormal",
                "activation": "sigmoid",
                "labels": ["abnormal"],
                "thresholds": {
                    "abnormal": round(points["abnormal"], 4),
                    "urgent": round(points["urgent"], 4),
                },
                "published": ["abnormal"] if published(validation, "abnormal") else [],
            },
            {
                "name": "severity",
                "role": "severity",
                "activation": "none",
                "labels": SEVERITY_LABELS,
                "ranges": {
                    label: [0.0, top] for label, top in zip(SEVERITY_LABELS, SEVERITY_MAX, strict=True)
                },
                "units": {"extent": "of 8", "opacity": "of 6"},
                "published": severity,
            },
            {
                "name": "risk_logit",
                "role": "risk",
                "activation": "sigmoid",
                "labels": ["adverse_outcome"],
                "thresholds": {"adverse_outcome": round(points["risk"], 4)} if "risk" in points else {},
                "published": ["adverse_outcome"] if risk_ok else [],
            },
            {
                "name": "ood_score",
                "role": "ood",
                "activation": "none",
                "labels": ["ood"],
                "thresholds": {"ood": round(points["ood"], 4)},
            },
            {
                "name": "heatmap",
                "role": "heatmap",
                "activation": "none",
                "published": ["zones"] if published(validation, "zones") else [],
            },
            {"name": "lung_mask", "role": "lung_mask", "activation": "sigmoid", "thresholds": {"lung": 0.5}},
            {
                "name": "heart_mask",
                "role": "heart_mask",
                "activation": "sigmoid",
                "thresholds": {"heart": 0.5},
                "published": ["cardiothoracic_ratio"]
                if published(validation, "cardiothoracic_ratio")
                else [],
            },
            {"name": "embedding", "role": "embedding", "activation": "none"},
        ],
        "triage": {
            "abnormal_threshold": round(points["abnormal"], 4),
            "urgent_threshold": round(points["urgent"], 4),
            # Three quarters of both lungs involved, only where the extent itself is published.
            "urgent_extent": 6.0 if "extent" in severity else None,
            "urgent_risk": round(points["urgent_risk"], 4) if risk_ok else None,
            "cardiomegaly_ratio": 0.5,
            # The severity scores and the outcomes come from COVID-19 and other pneumonia patients.
            "measures_require": [label for label in ("COVID-19", "Pneumonia") if label in findings],
        },
        "heatmap_label": "abnormal",
        "not_assessed": NOT_ASSESSED,
        "training": {k: v for k, v in training.items() if isinstance(v, (str, int, float))},
        "validation": validation,
    }


def write_manifest(out: Path, content: dict[str, Any]) -> None:
    path = out / "manifest.yaml"
    header = (
        "# Written by tools/training/export_onnx.py and tools/engines/quantize.py;"
        " operating points chosen on validation.\n"
    )
    path.write_text(header + yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    load_manifest(path)  # refuse to leave an invalid manifest behind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=data.REPO / "engines" / NAME)
    parser.add_argument("--checkpoint", type=Path, help="default <out>/checkpoints/model.pt")
    parser.add_argument("--data", help="images for the torch comparison (default $CXR_DATA)")
    parser.add_argument("--compare-images", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        model, content = load_checkpoint(args.checkpoint or args.out / "checkpoints" / "model.pt")
        onnx_path = args.out / "model.onnx"
        export(model, onnx_path)
        folder = data.data_dir(args.data)
        diffs, sizes = compare(model, onnx_path, sample_inputs(folder, args.compare_images, seed=0))
        report = {"opset": OPSET, "max_abs_diff": diffs, "tolerance": EXPORT_TOLERANCE}
        (args.out / "export_report.json").write_text(json.dumps(report, indent=1) + "\n")
        for name, diff in diffs.items():
            print(f"{name:16s} max |onnx - torch| = {diff:.2e}")
        entries = {"fp32": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)}}
        write_manifest(
            args.out,
            manifest_dict(content["points"], content["training"], entries, content.get("validation", {})),
        )
        bad = {name: diff for name, diff in diffs.items() if diff > EXPORT_TOLERANCE * max(1.0, sizes[name])}
        if bad:
            print(f"error: ONNX differs from torch beyond tolerance: {bad}", file=sys.stderr)
            return 1
        print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and {args.out / 'manifest.yaml'}")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
