"""Evaluate what the appliance publishes: the Analyzer's own Result objects, scored against the labels.

    .venv/bin/cxr-evaluate --json OUT [--data DIR] [--model engines/cxr-lite0] [--precision fp32]

Which images: when DIR is the data the model was trained on (same metadata.csv hash as the manifest's
training record) only the model's validation patients (split.json) are scored; any other folder with a
metadata.csv is evaluated whole, without flags. Every file goes through `Analyzer.analyze`, exactly as
`cxr-appliance process` and the daemon run it (reader, tag gate, preprocessing, backend, the decision
table), and only what a Result carries is scored: an unpublished output has no figure here.

Reported, each with a 95 % patient-level bootstrap interval: refusal (laterals, CT, generated and
package-shipped non-medical pictures, false refusal of frontal CXRs), abnormal AUC pooled and within
source (NIH normal vs pneumonia, JSRT normal vs nodule, ... where no source shortcut helps), triage
sensitivity/specificity at the shipped operating point, every published finding, severity R², outcome
AUC, the cardiothoracic ratio against the reference masks, the mirror test (does the dominant side of
the lung zones follow a mirrored image?) and the text audit (decisions.audit on every result).

Beside this file: evaluate_images.py (which images, through the Analyzer), evaluate_scores.py (the
figures) and evaluate_probes.py (mirror test, non-medical pictures, latency).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from appliance.errors import UserError
from appliance.manifest import Precision, Role, load_manifest
from tools.training import dataset as data
from tools.training.evaluate_images import analyze, choose_records, make_analyzer
from tools.training.evaluate_probes import latency, mirror_test, non_medical
from tools.training.evaluate_scores import score

KEYS = [
    "n_images",
    "view.accuracy",
    "refusal.lateral_refused_rate",
    "refusal.ct_refused_rate",
    "refusal.cxr_false_refusal_rate",
    "refusal.labelled_frontal_false_refusal_rate",
    "finding.macro_auc",
    "finding.macro_auc_within_source",
    "abnormal.auc",
    "abnormal.auc_within_source",
    "triage.sensitivity",
    "triage.specificity",
    "severity.extent_r2",
    "severity.extent_mae",
    "severity.opacity_r2",
    "outcome.auc",
    "outcome.auc_within_source",
    "cardiac.ctr_mae",
    "mirror.dominant_side_consistency",
    "zones.left_share",
    "text.contradictions",
]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    folder = data.data_dir(args.data)
    manifest = load_manifest(args.model)
    records, split = choose_records(folder, manifest.folder, dict(manifest.training), args.split)
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise UserError(f"{folder}: no images to evaluate (split {split!r})")
    with (folder / "metadata.csv").open(newline="") as handle:
        raw: dict[str, dict[str, str]] = {row["file"]: row for row in csv.DictReader(handle)}
    analyzer = make_analyzer(args.model, args.precision, args.threads)
    results = analyze(analyzer, [folder / r.file for r in records], "evaluate")
    findings_spec = manifest.output(Role.findings)
    published = [
        label
        for label in (findings_spec.labels if findings_spec else [])
        if findings_spec and findings_spec.is_published(label) and label != findings_spec.normal_label
    ]
    result = score(records, results, raw, folder, published, args.seed)
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
        work = Path(tmp)
        mirror = mirror_test(analyzer, records, results, folder, args.mirror, work)
        result["mirror.dominant_side_consistency"] = mirror["consistency"]
        result["mirror.dominant_side_consistency_ci"] = None
        result["detail"]["mirror"] = mirror
        frontal_files = [folder / r.file for r in records if r.view == data.VIEW_FRONTAL and not r.is_dicom]
        result["detail"]["non_medical"] = non_medical(analyzer, args.generated, frontal_files, work)
    result["detail"].update(
        {
            "precision": args.precision,
            "split": split,
            "model": f"{manifest.name} {manifest.version}",
            "sha256": analyzer.backend.model_sha256,
            "published_findings": published,
        }
    )
    if args.latency:
        result["detail"]["latency"] = latency(analyzer, results, args.latency)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder with metadata.csv (default $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--model", type=Path, default=data.REPO / "engines" / "cxr-lite0" / "manifest.yaml")
    parser.add_argument("--precision", default="fp32", choices=[p.value for p in Precision])
    parser.add_argument(
        "--split",
        default="auto",
        choices=["auto", "validation", "all"],
        help="auto: the validation patients on the training data, every image elsewhere",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the metrics")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="first N images only (CI)")
    parser.add_argument(
        "--generated", type=int, default=60, help="generated non-medical images to test refusal"
    )
    parser.add_argument("--mirror", type=int, default=400, help="images in the mirror test (at most)")
    parser.add_argument("--latency", type=int, default=0, help="also time N batch-1 inferences")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for key in KEYS:
        value, ci = result.get(key), result.get(f"{key}_ci")
        shown = "null" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:36s} {shown}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    for name, entry in result["detail"]["within_source_pairs"].items():
        print(f"  {name:34s} {json.dumps(entry)}")
    for label, entry in result["detail"]["findings"].items():
        print(f"  finding {label:26s} {json.dumps(entry)}")
    nm = result["detail"]["non_medical"]
    print(f"{'non-medical generated refused':36s} {nm['generated_refused_rate']} (n={nm['generated_n']})")
    print(f"{'package images refused':36s} {nm['package_images_refused_rate']} (n={nm['package_images_n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
