"""Where recalibration's labelled cases come from, and their scores.

Labels come from the site's CSV (`file` or `image_id`, `label` normal/abnormal, optional `patient`,
optional 0/1 columns named like the model's published findings) and/or the clinicians' agree/disagree
feedback in the journal. Scores come from the appliance's own Analyzer (same decoders, preprocessing
and backend as the daemon) or, for an `image_id` row or feedback, from the result the journal stored.
"""

from __future__ import annotations

import contextlib
import csv
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.manifest import Manifest, Role
from appliance.overlay import ABNORMAL, FINDINGS_PREFIX
from appliance.result import Result

LABEL_COLUMNS = ("file", "image_id", "label", "patient")


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


@contextlib.contextmanager
def _utf8(path: Path) -> Iterator[None]:
    """A spreadsheet saved as Latin-1 or Windows-1252 (Excel's default CSV): said plainly, with the fix."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); save it as CSV UTF-8"
        ) from exc


def read_label_csv(path: Path, manifest: Manifest) -> list[LabelRow]:
    """Parse the site's label file; a wrong column or value stops the run with its line number."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    findings = finding_labels(manifest)
    with handle, _utf8(path):
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


def merge_cases(primary: Iterable[Case], extra: Iterable[Case]) -> list[Case]:
    """The CSV's explicit label wins over feedback for the same image (and the first of repeats)."""
    merged: dict[str, Case] = {}
    for case in [*primary, *extra]:
        merged.setdefault(case.image_id, case)
    return list(merged.values())
