"""`cxr-appliance recalibrate`: site operating points from the site's own labelled cases.

Labels come from a CSV (`file` or `image_id`, `label` normal/abnormal, optional `patient`, optional 0/1
columns named like the model's published findings) and/or the clinicians' agree/disagree feedback in
the journal. Scores come from the appliance's own Analyzer (same decoders, preprocessing and backend as
the daemon) or, for an `image_id` row or feedback, from the result the journal stored. For each output
with enough cases the threshold reaching the target is chosen, and a report gives sensitivity and
specificity at the shipped and the site point with bootstrap 95 % intervals over patients. The result
is a site overlay (appliance/overlay.py); the shipped manifest is never touched.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from appliance import NOT_FOR_DIAGNOSTIC_USE
from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.manifest import Manifest, Role, load_manifest
from appliance.operating_points import (
    bootstrap_ci,
    sensitivity,
    specificity,
    threshold_at_sensitivity,
    threshold_at_specificity,
)
from appliance.overlay import (
    ABNORMAL,
    FINDINGS_PREFIX,
    CaseCount,
    SiteOverlay,
    Target,
    manifest_file,
    manifest_sha256,
    shipped_threshold,
    unpublishable,
    write_overlay,
)
from appliance.result import Result

# With 20 positives one missed case moves sensitivity by 5 points and the 95 % interval of a 0.95
# sensitivity still spans about 0.75-0.99: fewer cases choose a point by noise, not by the site.
MIN_CASES = 20
BOOTSTRAP_RESAMPLES = 2000
DEFAULT_SENSITIVITY = 0.95
LABEL_COLUMNS = ("file", "image_id", "label", "patient")

Metric = Callable[[np.ndarray, np.ndarray, float], float | None]

FEEDBACK_BIAS = (
    "Feedback labels are biased towards the model: the clinician saw the AI reading before agreeing"
    " or disagreeing, and only acknowledged results are labelled. Prefer independently labelled cases."
)
OPTIMISM = (
    "The site point was chosen on these same cases, so its figures here are optimistic; check them on"
    " later cases before relying on them."
)


@dataclass
class LabelRow:
    line: int
    file: Path | None
    image_id: str | None
    patient: str | None
    labels: dict[str, int]


@dataclass
class Case:
    image_id: str
    group: str  # the bootstrap unit: the patient when known, else the case itself
    labels: dict[str, int]  # overlay key -> 1 positive, 0 negative
    scores: dict[str, float]  # overlay key -> the model's score


@dataclass
class Intake:
    """What came in and what was left out, for the report."""

    rows: int = 0
    feedback_rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def finding_labels(manifest: Manifest) -> list[str]:
    spec = manifest.output(Role.findings)
    return [label for label in spec.labels if label != spec.normal_label] if spec is not None else []


def read_label_csv(path: Path, manifest: Manifest) -> list[LabelRow]:
    """Parse the site's label file; a wrong column or value stops the run with its line number."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    findings = finding_labels(manifest)
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        unknown = [c for c in columns if c not in LABEL_COLUMNS and c not in findings]
        if unknown:
            raise UserError(
                f"{path}: unknown column(s) {', '.join(unknown)}; expected {', '.join(LABEL_COLUMNS)}"
                f" or findings of {manifest.name}: {', '.join(findings)}"
            )
        if "file" not in columns and "image_id" not in columns:
            raise UserError(f"{path}: needs a 'file' or an 'image_id' column")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("file") and not row.get("image_id"):
                raise UserError(f"{path}:{line}: neither file nor image_id given")
            labels: dict[str, int] = {}
            if label := row.get("label", "").lower():
                if label not in ("normal", "abnormal"):
                    raise UserError(f"{path}:{line}: label {label!r} is not 'normal' or 'abnormal'")
                labels[ABNORMAL] = int(label == "abnormal")
            for finding in (c for c in columns if c in findings):
                if value := row.get(finding, ""):
                    if value not in ("0", "1"):
                        raise UserError(f"{path}:{line}: {finding} {value!r} is not 0 or 1")
                    labels[FINDINGS_PREFIX + finding] = int(value)
            rows.append(
                LabelRow(
                    line=line,
                    file=path.parent / row["file"] if row.get("file") else None,
                    image_id=row.get("image_id") or None,
                    patient=row.get("patient") or None,
                    labels=labels,
                )
            )
    return rows


def scores_of(result: Result) -> dict[str, float]:
    """The published scores of one result, by overlay key (unpublished outputs carry none)."""
    scores = {FINDINGS_PREFIX + f.label: f.score for f in result.findings}
    if result.abnormal is not None:
        scores[ABNORMAL] = result.abnormal.score
    return scores


def _usable(result: Result | None, manifest: Manifest, intake: Intake) -> bool:
    if result is None:
        intake.skipped["no result in the journal"] += 1
    elif (result.provenance.model, result.provenance.model_version) != (manifest.name, manifest.version):
        intake.skipped["scored by another model"] += 1
    elif result.status != "ok":
        intake.skipped[f"not read by the appliance ({result.reason})"] += 1
    else:
        return True
    return False


def _journal(config: AppConfig) -> Any:
    from appliance.journal import Journal

    if not config.journal.path.exists():
        raise UserError(f"{config.journal.path}: no journal yet (the daemon has not processed an image)")
    return Journal(config.journal.path)


def cases_from_labels(
    rows: list[LabelRow], config: AppConfig, manifest: Manifest, intake: Intake
) -> list[Case]:
    """Score the labelled images: files through the Analyzer, image ids from the journal."""
    results: list[tuple[LabelRow, Result | None]] = []
    files = [row for row in rows if row.file is not None]
    if files:
        from appliance.assemble import build_analyzer, job_for_file

        # The shipped points: an overlay in force must neither change nor block the scores.
        plain = config.model_copy(
            update={"inference": config.inference.model_copy(update={"site_overlay": None})}
        )
        analyzer = build_analyzer(plain, salt_required=False, create_salt=False)
        batch = max(1, config.inference.max_batch)
        try:
            for start in range(0, len(files), batch):
                chunk = files[start : start + batch]
                jobs = [job_for_file(row.file, source="recalibrate") for row in chunk if row.file]
                results += zip(chunk, analyzer.analyze(jobs), strict=True)
        finally:
            analyzer.backend.close()
    by_id = [row for row in rows if row.file is None]
    if by_id:
        journal = _journal(config)
        try:
            results += [(row, journal.result_for(row.image_id)) for row in by_id if row.image_id]
        finally:
            journal.close()
    cases = []
    for row, result in results:
        if not _usable(result, manifest, intake):
            continue
        assert result is not None
        image_id = result.image.image_id
        group = row.patient or result.patient_key or f"case:{image_id}"
        cases.append(Case(image_id, group, row.labels, scores_of(result)))
    return cases


def cases_from_feedback(
    config: AppConfig, manifest: Manifest, since: str | None, intake: Intake
) -> list[Case]:
    """Triage labels from the clinicians' verdicts: the reading's triage when they agreed, the
    opposite when they disagreed; 'unsure' is no label, and conflicting verdicts drop the case."""
    journal = _journal(config)
    try:
        try:
            rows = journal.feedback(since=since)
        except ValueError as exc:
            raise UserError(f"--since: {exc}") from exc
        intake.feedback_rows = len(rows)
        by_message: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_message.setdefault(row["message_id"], []).append(row)
        cases = []
        for acks in by_message.values():
            first = acks[0]
            verdicts = {a["verdict"] for a in acks if a["verdict"] in ("agree", "disagree")}
            if not verdicts:
                intake.skipped["feedback without agree/disagree"] += 1
                continue
            said_abnormal = first["triage"] in ("abnormal", "urgent")
            labels = {said_abnormal == (verdict == "agree") for verdict in verdicts}
            if len(labels) > 1:
                intake.skipped["clinicians' verdicts conflict"] += 1
                continue
            result = journal.result_for(first["image_id"])
            if not _usable(result, manifest, intake):
                continue
            assert result is not None
            scores = scores_of(result)
            if ABNORMAL not in scores:
                intake.skipped["no published abnormal score"] += 1
                continue
            group = first["patient_key"] or f"case:{first['image_id']}"
            cases.append(Case(first["image_id"], group, {ABNORMAL: int(labels.pop())}, scores))
        return cases
    finally:
        journal.close()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def figures(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at `threshold` with patient-bootstrap 95 % intervals."""
    out: dict[str, Any] = {"threshold": threshold}
    for name, metric in (("sensitivity", sensitivity), ("specificity", specificity)):

        def resampled(idx: np.ndarray, metric: Metric = metric) -> float | None:
            return metric(labels[idx], scores[idx], threshold)

        out[name] = _rounded(metric(labels, scores, threshold))
        ci = bootstrap_ci(groups, resampled, BOOTSTRAP_RESAMPLES)
        out[f"{name}_ci"] = [round(v, 4) for v in ci] if ci else None
    return out


def assess(key: str, cases: list[Case], manifest: Manifest, target: Target) -> dict[str, Any]:
    """One output's report entry: refused with the reason, or the chosen site point."""
    labelled = [c.labels[key] for c in cases if key in c.labels]
    entry: dict[str, Any] = {
        "output": key,
        "positives": sum(labelled),
        "negatives": len(labelled) - sum(labelled),
    }
    if problem := unpublishable(manifest, key):
        return {**entry, "status": "refused", "reason": f"{problem}; recalibration never publishes an output"}
    if entry["positives"] < MIN_CASES or entry["negatives"] < MIN_CASES:
        return {
            **entry,
            "status": "refused",
            "reason": f"too few cases: {entry['positives']} positive and {entry['negatives']} negative;"
            f" at least {MIN_CASES} of each are needed",
        }
    # A read image carries every published score, so each labelled case is scored here.
    scored = [c for c in cases if key in c.labels and key in c.scores]
    labels = np.array([c.labels[key] for c in scored], dtype=int)
    scores = np.array([c.scores[key] for c in scored], dtype=np.float64)
    groups = np.array([c.group for c in scored])
    choose = threshold_at_sensitivity if target.metric == "sensitivity" else threshold_at_specificity
    chosen = round(choose(labels, scores, target.value), 6)
    urgent = manifest.triage.urgent_threshold
    if key == ABNORMAL and urgent is not None and chosen > urgent:
        return {
            **entry,
            "status": "refused",
            "reason": f"the chosen point {chosen:.4f} lies above the urgent point {urgent}, which is not"
            " recalibrated",
        }
    shipped = shipped_threshold(manifest, key)
    return {
        **entry,
        "status": "recalibrated",
        "shipped": figures(labels, scores, groups, shipped) if shipped is not None else None,
        "site": figures(labels, scores, groups, chosen),
    }


def _interval(values: list[float] | None) -> str:
    return f"{values[0]:.2f}–{values[1]:.2f}" if values else "n/a"


def _point(name: str, fig: dict[str, Any]) -> str:
    def value(metric: str) -> str:
        v = fig[metric]
        return "n/a" if v is None else f"{v:.2f} ({_interval(fig[f'{metric}_ci'])})"

    return f"| {name} | {fig['threshold']:.6g} | {value('sensitivity')} | {value('specificity')} |"


def markdown(report: dict[str, Any]) -> str:
    target = report["target"]
    intake = report["cases"]
    lines = [
        "# Site recalibration report",
        "",
        f"{NOT_FOR_DIAGNOSTIC_USE}. Written by `cxr-appliance recalibrate` at {report['created_at']}.",
        "",
        f"- Overlay: `{report['overlay']}`, id `{report['overlay_id']}`",
        f"- Model: {report['model']} {report['model_version']}, manifest sha256 `{report['manifest_sha256']}`",
        f"- Labels: {report['source']}",
        f"- Cases used: {intake['used']}; left out: {intake['left_out'] or 'none'}",
        f"- Target: {target['metric']} at least {target['value']} for every recalibrated output",
        f"- Intervals: 95 % percentile bootstrap, {report['bootstrap_resamples']} resamples of patients"
        " (of cases where the patient is unknown)",
        f"- Minimum: {MIN_CASES} positive and {MIN_CASES} negative cases per output",
        "",
    ]
    for entry in report["outputs"]:
        lines += [f"## {entry['output']}: {entry['status']}", ""]
        lines.append(f"{entry['positives']} positive, {entry['negatives']} negative cases.")
        if entry["status"] != "recalibrated":
            lines += ["", f"Not changed: {entry['reason']}.", ""]
            continue
        lines += [
            "",
            "| point | threshold | sensitivity (95 % CI) | specificity (95 % CI) |",
            "|---|---|---|---|",
        ]
        if entry["shipped"] is not None:
            lines.append(_point("shipped", entry["shipped"]))
        lines += [_point("site", entry["site"]), ""]
    lines += ["## Caveats", "", *(f"- {c}" for c in report["caveats"])]
    return "\n".join(lines) + "\n"


def report_paths(overlay: Path) -> tuple[Path, Path]:
    stem = overlay.with_suffix("")
    return stem.with_name(stem.name + ".report.md"), stem.with_name(stem.name + ".report.json")


def _merge(primary: Iterable[Case], extra: Iterable[Case]) -> list[Case]:
    """The CSV's explicit label wins over feedback for the same image (and the first of repeats)."""
    merged: dict[str, Case] = {}
    for case in [*primary, *extra]:
        merged.setdefault(case.image_id, case)
    return list(merged.values())


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
    cases = _merge(csv_cases, feedback_cases)
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
    md_path, json_path = report_paths(out)
    md_path.write_text(markdown(report), encoding="utf-8")
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
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
