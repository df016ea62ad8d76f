"""`cxr-appliance recalibrate`: site operating points from the site's own labelled cases.

The labelled cases come from a CSV and/or the clinicians' feedback (recalibrate_cases.py). For each
output with enough cases the threshold reaching the target is chosen, and a report gives sensitivity
and specificity at the shipped and the site point with bootstrap 95 % intervals over patients
(recalibrate_report.py). The result is a site overlay (appliance/overlay.py); the shipped manifest is
never touched.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.manifest import load_manifest
from appliance.overlay import (
    ABNORMAL,
    CaseCount,
    SiteOverlay,
    Target,
    manifest_file,
    manifest_sha256,
    write_overlay,
)
from appliance.recalibrate_cases import (
    Case,
    Intake,
    cases_from_feedback,
    cases_from_labels,
    merge_cases,
    read_label_csv,
)
from appliance.recalibrate_report import BOOTSTRAP_RESAMPLES, MIN_CASES, assess, report_paths, write_report

DEFAULT_SENSITIVITY = 0.95

FEEDBACK_BIAS = (
    "Feedback labels are biased towards the model: the clinician saw the AI reading before agreeing"
    " or disagreeing, and only acknowledged results are labelled. Prefer independently labelled cases."
)
OPTIMISM = (
    "The site point was chosen on these same cases, so its figures here are optimistic; check them on"
    " later cases before relying on them."
)


def recalibrate(args: argparse.Namespace, config: AppConfig) -> tuple[Path, dict[str, Any]]:
    """Choose the points, write overlay and report; raise UserError (nothing written) when refused."""
    if args.labels is None and not args.from_feedback:
        raise UserError("give --labels CSV and/or --from-feedback")
    out: Path | None = args.out or config.inference.site_overlay
    if out is None:
        raise UserError("say where the overlay goes: --out FILE or inference.site_overlay in the config")
    manifest = load_manifest(config.inference.model)
    if out.resolve().parent == manifest_file(config.inference.model).resolve().parent:
        raise UserError(
            f"{out}: the overlay never goes into the model's folder (the shipped model stays as is)"
        )
    target = (
        Target(metric="specificity", value=args.specificity)
        if args.specificity is not None
        else Target(metric="sensitivity", value=args.sensitivity or DEFAULT_SENSITIVITY)
    )
    intake = Intake()
    sources: list[str] = []
    csv_cases: list[Case] = []
    if args.labels is not None:
        rows = read_label_csv(args.labels, manifest)
        intake.rows = len(rows)
        csv_cases = cases_from_labels(rows, config, manifest, intake)
        sources.append(f"{args.labels.name} ({len(rows)} rows)")
    feedback_cases: list[Case] = []
    if args.from_feedback:
        feedback_cases = cases_from_feedback(config, manifest, args.since, intake)
        since = f" since {args.since}" if args.since else ""
        sources.append(f"clinicians' feedback{since} ({intake.feedback_rows} acknowledgements)")
    cases = merge_cases(csv_cases, feedback_cases)
    keys = sorted({key for case in cases for key in case.labels}, key=lambda k: (k != ABNORMAL, k))
    if not keys:
        raise UserError(
            f"recalibration refused, no overlay written: no labelled case could be used ({dict(intake.skipped)})"
        )
    entries = [assess(key, cases, manifest, target) for key in keys]
    chosen = [e for e in entries if e["status"] == "recalibrated"]
    if not chosen:
        reasons = "\n  ".join(f"{e['output']}: {e['reason']}" for e in entries)
        raise UserError(f"recalibration refused, no overlay written:\n  {reasons}")
    overlay = SiteOverlay(
        model=manifest.name,
        model_version=manifest.version,
        manifest_sha256=manifest_sha256(config.inference.model),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source="; ".join(sources),
        target=target,
        thresholds={e["output"]: e["site"]["threshold"] for e in chosen},
        cases={e["output"]: CaseCount(positives=e["positives"], negatives=e["negatives"]) for e in chosen},
    ).sealed()
    caveats = [OPTIMISM]
    if feedback_cases:
        caveats.append(FEEDBACK_BIAS)
    report = {
        "overlay": str(out),
        "overlay_id": overlay.id,
        "model": manifest.name,
        "model_version": manifest.version,
        "manifest_sha256": overlay.manifest_sha256,
        "created_at": overlay.created_at,
        "source": overlay.source,
        "target": target.model_dump(),
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "min_cases": MIN_CASES,
        "cases": {
            "rows": intake.rows,
            "feedback_rows": intake.feedback_rows,
            "used": len(cases),
            "from_feedback": sum(c in feedback_cases for c in cases),
            "left_out": dict(intake.skipped),
        },
        "outputs": entries,
        "caveats": caveats,
    }
    write_overlay(overlay, out)
    write_report(report, out)
    return out, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=Path, help="CSV: file or image_id, label (normal/abnormal), ...")
    parser.add_argument(
        "--from-feedback", action="store_true", help="also use the clinicians' agree/disagree verdicts"
    )
    parser.add_argument("--since", help="feedback received at or after this ISO 8601 time only")
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument(
        "--sensitivity",
        type=float,
        help=f"choose the highest threshold with at least this sensitivity (default {DEFAULT_SENSITIVITY})",
    )
    goal.add_argument("--specificity", type=float, help="choose the lowest threshold with this specificity")
    parser.add_argument("--out", type=Path, help="overlay file (default: inference.site_overlay)")


def main(args: argparse.Namespace, config: AppConfig) -> int:
    for name in ("sensitivity", "specificity"):
        value = getattr(args, name)
        if value is not None and not 0 < value < 1:
            raise UserError(f"--{name} must lie between 0 and 1")
    out, report = recalibrate(args, config)
    md_path, json_path = report_paths(out)
    for entry in report["outputs"]:
        if entry["status"] == "recalibrated":
            old = entry["shipped"]["threshold"] if entry["shipped"] else None
            print(f"{entry['output']}: {old} -> {entry['site']['threshold']}")
        else:
            print(f"{entry['output']}: not changed: {entry['reason']}")
    print(f"overlay {report['overlay_id'][:12]} written to {out}")
    print(f"report: {md_path} and {json_path}")
    if config.inference.site_overlay is None or config.inference.site_overlay.resolve() != out.resolve():
        print(f"to use it: set inference.site_overlay: {out} and reload (systemctl reload cxr-appliance)")
    else:
        print("to use it: reload the appliance (systemctl reload cxr-appliance)")
    return 0
