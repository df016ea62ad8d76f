"""Sequence-aware deterioration risk: a tiny logistic model on a patient's current and prior image.

    .venv/bin/cxr-train-sequence-risk --model engines/cxr-lite0 [--data DIR] [--smoke N]

Patients of DIR/metadata.csv with two or more frontal X-rays that have offset_days and a known outcome
(death, ICU or intubation -> 1; every known outcome negative -> 0) are read by the appliance's own
Analyzer (appliance.ingest.read_image, appliance.preprocess, ONNX Runtime). Each read image with a
strictly earlier read image of the same patient forms a pair (current, most recent prior), as the
daemon links them through the journal. Features come from appliance/interpret/sequence_risk.py.

The model is fitted on the TRAIN patients of the model's split.json (L2 strength and operating point
from patient-grouped cross-validation on train only), then compared with the single-image risk on the
VALIDATION pairs (AUC, 95 % patient-level bootstrap). It is written as coefficients into the manifest
(`sequence_risk`) with `enabled: true` only if its validation AUC is at least the single-image AUC
on at least MIN_VALIDATION_PATIENTS validation patients.
Reports: <model>/sequence_risk_report.json and .md. --smoke N uses N patients per split and never
enables the model.

Embedding features are deliberately not used: a Result (and so the journal) does not keep the
embedding, and with a few dozen training patients they would only add variance.

Beside this file: sequence_risk_pairs.py (images, Analyzer reads, pairs), sequence_risk_model.py (the
logistic model and its cross-validation), sequence_risk_report.py (comparison, decision, report).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from appliance.errors import ManifestError, UserError
from appliance.interpret.sequence_risk import probability
from appliance.manifest import Precision, SequenceRisk, load_manifest
from tools.training import dataset as data
from tools.training import metrics
from tools.training.sequence_risk_model import FEATURES, fit, log_loss, matrix, out_of_fold
from tools.training.sequence_risk_pairs import make_pairs, read_all, select
from tools.training.sequence_risk_report import auc_text, compare, counts, decide, markdown, parity_checks

LAMBDAS = [0.3, 1.0, 3.0, 10.0, 30.0, 100.0]  # L2 strengths tried (standardised features)
REPORT = "sequence_risk_report"


def refuse_to_overwrite(folder: Path) -> None:
    """A smoke run must not replace a full run's model and report (run it on a copy of the folder)."""
    path = folder / f"{REPORT}.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if previous.get("smoke") is None:
        raise UserError(f"{path}: holds a full run; a --smoke run needs a copy of the model folder")


def update_manifest(path: Path, entry: dict[str, Any]) -> None:
    """Add or replace `sequence_risk`, keeping the header comment; refuse to leave an invalid manifest."""
    original = path.read_text()
    content = yaml.safe_load(original)
    content["sequence_risk"] = entry
    header = original.split("\n", 1)[0] if original.startswith("#") else ""
    path.write_text((header + "\n" if header else "") + yaml.safe_dump(content, sort_keys=False))
    try:
        load_manifest(path)
    except ManifestError:
        path.write_text(original)
        raise


def run(args: argparse.Namespace) -> dict[str, Any]:
    manifest = load_manifest(args.model)
    manifest.verify_file(Precision.fp32)
    if args.smoke is not None:
        refuse_to_overwrite(manifest.folder)
    folder = data.data_dir(args.data)
    split = data.read_split(manifest.folder / "split.json")
    images = select(folder, split, args.smoke)
    results = read_all(manifest, folder, images, args.threads)
    pairs = make_pairs(images, results)
    train = [p for p in pairs if p.split == "train"]
    val = [p for p in pairs if p.split == "validation"]
    x, y, groups, single = matrix(train)
    if len(np.unique(y)) < 2:
        raise UserError("the training pairs have only one outcome class: nothing to fit")
    losses = {}
    for lam in LAMBDAS:
        oof = out_of_fold(x, y, groups, lam)
        ok = ~np.isnan(oof)
        losses[lam] = log_loss(y[ok], oof[ok]) if ok.any() else math.inf
    lam = min(LAMBDAS, key=lambda value: (losses[value], -value))  # ties: the stronger penalty
    oof = out_of_fold(x, y, groups, lam)
    ok = ~np.isnan(oof)
    threshold = metrics.youden_threshold(y[ok].astype(bool), oof[ok]) if ok.any() else 0.5
    model = fit(x, y, lam)
    entry: dict[str, Any] = {
        "enabled": False,
        "features": list(FEATURES),
        "mean": [float(v) for v in model.mean],
        "scale": [float(v) for v in model.scale],
        "coefficients": [float(v) for v in model.coefficients],
        "intercept": model.intercept,
        "threshold": float(min(max(threshold, 0.0), 1.0)),
        "report": f"{REPORT}.md",
    }
    spec = SequenceRisk.model_validate(entry)
    xv, yv, gv, sv = matrix(val)
    validation = compare(yv, sv, probability(xv, spec), gv)
    enabled, reason = decide(validation, args.smoke is not None)
    entry["enabled"] = enabled
    report: dict[str, Any] = {
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "onnx_sha256": manifest.onnx[Precision.fp32].sha256,
        },
        "smoke": args.smoke,
        "data": {side: counts(images, results, pairs, side) for side in ("train", "validation")},
        "features": list(FEATURES),
        "lambda": lam,
        "cv_log_loss": {str(k): round(v, 4) for k, v in losses.items()},
        "threshold": entry["threshold"],
        "coefficients": dict(zip(FEATURES, entry["coefficients"], strict=True)),
        "train": {
            "single_image_auc": metrics.auc(y, single),
            "sequence_oof_auc": metrics.auc(y[ok], oof[ok]) if ok.any() else None,
        },
        "validation": validation,
        "decision": {"enabled": enabled, "reason": reason},
        "parity_checks": parity_checks(val + train, model),
    }
    out = manifest.folder
    (out / f"{REPORT}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{REPORT}.md").write_text(markdown(report))
    update_manifest(out / "manifest.yaml", entry)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data.add_model_and_data_arguments(parser)
    parser.add_argument("--smoke", type=int, help="only this many patients per split; never enables")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (UserError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    v = report["validation"]
    print(
        f"validation: {v['pairs']} pairs / {v['patients']} patients; single-image AUC {auc_text(v['single_image'])},"
        f" sequence AUC {auc_text(v['sequence'])}; {'enabled' if report['decision']['enabled'] else 'not enabled'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
