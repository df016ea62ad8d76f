"""Site recalibration end to end: `cxr-appliance recalibrate` on real labelled X-rays with the real model,
the overlay applied by the real daemon (on SIGHUP) and by `process`, and every refusal.

The site cases are NIH frontal images of patients in the model's *training* split (never its
validation patients, on which the product is judged): No Finding as normal, Pneumonia as abnormal.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from appliance.assemble import build_analyzer, job_for_file
from appliance.config import DEFAULT_MODEL, AppConfig
from appliance.journal import Journal
from appliance.manifest import load_manifest, sha256_file
from appliance.overlay import OverlayError, SiteOverlay, read_overlay, write_overlay
from appliance.recalibrate import MIN_CASES
from appliance.result import Acknowledgement, Result
from testsupport import data
from testsupport.daemon import REPO, RESULT_TOPIC, DaemonProcess, wait_results, wait_until
from testsupport.mosquitto import Broker, Subscriber

SHIPPED = load_manifest(DEFAULT_MODEL)
assert SHIPPED.triage.abnormal_threshold is not None, "the bundled model has a triage point"
SHIPPED_ABNORMAL: float = SHIPPED.triage.abnormal_threshold
PER_CLASS = 40


@dataclass
class SiteCase:
    path: Path
    abnormal: bool
    patient: str


def site_cases(per_class: int) -> list[SiteCase]:
    """The first `per_class` normal and abnormal NIH images of training-split patients."""
    split = json.loads((DEFAULT_MODEL.parent / "split.json").read_text(encoding="utf-8"))
    train = set(split["train"])
    rows = [r for r in data.rows(source="nih") if r["patient_id"] in train and r["view"] in {"PA", "AP"}]
    picked = []
    for finding, abnormal in (("No Finding", False), ("Pneumonia", True)):
        chosen = [r for r in rows if r["finding"] == finding][:per_class]
        assert len(chosen) == per_class, f"not enough {finding} images in the data folder"
        picked += [SiteCase(data.cxr_data() / r["file"], abnormal, r["patient_id"]) for r in chosen]
    return picked


def write_labels(path: Path, cases: list[SiteCase], extra_columns: dict[str, str] | None = None) -> Path:
    """The site's label file; `file` relative to the CSV, as a site would write it next to its images."""
    images = path.parent / "images"
    images.mkdir(exist_ok=True)
    extra = extra_columns or {}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "patient", *extra])
        for case in cases:
            link = images / case.path.name
            if not link.exists():
                link.symlink_to(case.path)  # the data is read in place, never copied
            label = "abnormal" if case.abnormal else "normal"
            writer.writerow([f"images/{case.path.name}", label, case.patient, *extra.values()])
    return path


def write_config(folder: Path, **inference: object) -> Path:
    config = {
        "inference": {"model": str(DEFAULT_MODEL), "backend": "onnxruntime", **inference},
        "privacy": {"salt_file": str(folder / "salt")},
        "journal": {"path": str(folder / "journal.sqlite3")},
        "mqtt": {"enabled": False},
        "metrics": {"enabled": False},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The real `cxr-appliance` command line, in its own process (exit status and stderr as a user sees)."""
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class Calibrated:
    folder: Path
    config: Path
    overlay: Path
    report: dict[str, Any]
    report_md: str
    stdout: str


@pytest.fixture(scope="module")
def cases() -> list[SiteCase]:
    return site_cases(PER_CLASS)


@pytest.fixture(scope="module")
def extra_case() -> SiteCase:
    """One more normal image, outside the label file (the feedback test's conflicting verdicts)."""
    return site_cases(PER_CLASS + 1)[PER_CLASS]


@pytest.fixture(scope="module")
def scored(cases: list[SiteCase], extra_case: SiteCase) -> dict[Path, Result]:
    """The images read in-process with the shipped operating points (no overlay)."""
    analyzer = build_analyzer(AppConfig(), salt_required=False, create_salt=False)
    images = [case.path for case in [*cases, extra_case]]
    try:
        results = analyzer.analyze([job_for_file(path, source="test") for path in images])
    finally:
        analyzer.backend.close()
    return dict(zip(images, results, strict=True))


@pytest.fixture(scope="module")
def plain_results(cases: list[SiteCase], scored: dict[Path, Result]) -> list[Result]:
    return [scored[case.path] for case in cases]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, cases: list[SiteCase]) -> Calibrated:
    folder = tmp_path_factory.mktemp("site")
    labels = write_labels(folder / "labels.csv", cases, {"Pneumonia": "", "Atelectasis": "0"})
    config = write_config(folder)
    manifest_before = sha256_file(DEFAULT_MODEL)
    done = cli(
        "recalibrate",
        "-c",
        config,
        "--labels",
        labels,
        "--sensitivity",
        "0.95",
        "--out",
        folder / "site.yaml",
    )
    assert done.returncode == 0, done.stderr
    assert sha256_file(DEFAULT_MODEL) == manifest_before, "the shipped manifest must never be edited"
    return Calibrated(
        folder=folder,
        config=config,
        overlay=folder / "site.yaml",
        report=json.loads((folder / "site.report.json").read_text(encoding="utf-8")),
        report_md=(folder / "site.report.md").read_text(encoding="utf-8"),
        stdout=done.stdout,
    )


def test_recalibration_chooses_the_point_at_the_stated_sensitivity(
    calibrated: Calibrated, cases: list[SiteCase], plain_results: list[Result]
) -> None:
    overlay = read_overlay(calibrated.overlay)  # also checks the id against the content
    assert (overlay.model, overlay.model_version) == (SHIPPED.name, SHIPPED.version)
    assert overlay.manifest_sha256 == sha256_file(DEFAULT_MODEL)
    assert overlay.target.metric == "sensitivity" and overlay.target.value == 0.95
    assert set(overlay.thresholds) == {"abnormal"}, "blank Pneumonia and unpublished Atelectasis stay out"
    assert overlay.cases["abnormal"].positives == overlay.cases["abnormal"].negatives == PER_CLASS
    # The highest threshold that keeps >= 95 % of the abnormal cases above it, from the real scores.
    truth = np.array([c.abnormal for c in cases])
    scores = np.array([r.abnormal.score for r in plain_results if r.abnormal is not None])
    assert len(scores) == len(cases)
    site = overlay.thresholds["abnormal"]
    assert (scores[truth] >= site).mean() >= 0.95
    next_up = scores[truth & (scores >= site)].min()
    assert (scores[truth] >= next_up + 1e-9).mean() < 0.95, "not the highest point meeting the target"
    assert site != SHIPPED_ABNORMAL

    entries = {e["output"]: e for e in calibrated.report["outputs"]}
    assert calibrated.report["overlay_id"] == overlay.id
    abnormal = entries["abnormal"]
    assert abnormal["status"] == "recalibrated" and abnormal["site"]["threshold"] == site
    assert abnormal["shipped"]["threshold"] == SHIPPED_ABNORMAL
    for point in ("shipped", "site"):
        for metric in ("sensitivity", "specificity"):
            low, high = abnormal[point][f"{metric}_ci"]
            assert low <= abnormal[point][metric] <= high and high - low > 0
    assert abnormal["site"]["sensitivity"] == round(float((scores[truth] >= site).mean()), 4)
    assert abnormal["shipped"]["specificity"] == round(float((scores[~truth] < SHIPPED_ABNORMAL).mean()), 4)
    assert entries["findings.Atelectasis"]["status"] == "refused"
    assert "not published" in entries["findings.Atelectasis"]["reason"]
    assert "| site |" in calibrated.report_md and "95 % CI" in calibrated.report_md
    print(calibrated.report_md)  # the closing note quotes it (pytest -s)


def test_daemon_applies_the_overlay_on_sighup_and_names_it(
    calibrated: Calibrated,
    cases: list[SiteCase],
    plain_results: list[Result],
    broker: Broker,
    daemons: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    overlay = read_overlay(calibrated.overlay)
    site = overlay.thresholds["abnormal"]
    # Images the two points disagree on: normal with the shipped point, above the site point.
    between = [
        case
        for case, result in zip(cases, plain_results, strict=True)
        if result.triage == "normal"
        and result.abnormal is not None
        and site <= result.abnormal.score < SHIPPED_ABNORMAL
    ]
    assert len(between) >= 3, "the site point must move at least three real images"
    in_force = tmp_path / "site-overlay.yaml"
    shutil.copyfile(calibrated.overlay, in_force)
    # A later recalibration rewritten under the same name (here: back to the shipped point).
    rewritten = SiteOverlay.model_validate(
        {**overlay.model_dump(), "thresholds": {"abnormal": SHIPPED_ABNORMAL}}
    ).sealed()
    daemon = daemons(broker, DEFAULT_MODEL)

    def reload_and_read(image: Path, name: str, overlay_id: str, count: int) -> dict[str, Any]:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: f"site overlay {overlay_id[:12]}" in daemon.log(), 60), daemon.log()[-3000:]
        shutil.copyfile(image, daemon.inbox / f"{name}{image.suffix}")
        return wait_results(sub, count, timeout=60)[count - 1]

    with Subscriber(broker, RESULT_TOPIC, client_id="ward-recalibrate") as sub:
        daemon.start()
        shutil.copyfile(between[0].path, daemon.inbox / f"before{between[0].path.suffix}")
        before = wait_results(sub, 1, timeout=60)[0]
        config = yaml.safe_load(daemon.config_path.read_text())
        config["inference"]["site_overlay"] = str(in_force)
        daemon.config_path.write_text(yaml.safe_dump(config))
        after = reload_and_read(between[1].path, "after", overlay.id, 2)
        write_overlay(rewritten, in_force)
        again = reload_and_read(between[2].path, "again", rewritten.id, 3)
    assert before["provenance"]["site_overlay"] is None
    assert before["abnormal"]["threshold"] == SHIPPED_ABNORMAL and before["triage"] == "normal"
    assert after["provenance"]["site_overlay"] == overlay.id
    assert after["abnormal"]["threshold"] == site and after["abnormal"]["positive"] is True
    assert after["triage"] == "abnormal", after["text"]
    assert again["provenance"]["site_overlay"] == rewritten.id != overlay.id
    assert again["abnormal"]["threshold"] == SHIPPED_ABNORMAL and again["triage"] == "normal"


def test_process_and_doctor_use_the_overlay_named_in_the_config(
    calibrated: Calibrated, cases: list[SiteCase], tmp_path: Path
) -> None:
    overlay = read_overlay(calibrated.overlay)
    config = write_config(tmp_path, site_overlay=str(calibrated.overlay))
    done = cli("process", "-c", config, "--json", cases[0].path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[0])
    assert result["provenance"]["site_overlay"] == overlay.id
    assert result["abnormal"]["threshold"] == overlay.thresholds["abnormal"]
    doctor = cli("doctor", "-c", config)
    line = next(x for x in doctor.stdout.splitlines() if " overlay " in x)
    assert line.startswith("OK") and overlay.id[:12] in line and str(SHIPPED_ABNORMAL) in line
    (tmp_path / "plain").mkdir()
    no_overlay = cli("doctor", "-c", write_config(tmp_path / "plain"))
    line = next(x for x in no_overlay.stdout.splitlines() if " overlay " in x)
    assert line.startswith("OK") and "none" in line


def test_too_few_cases_are_refused_and_nothing_is_written(cases: list[SiteCase], tmp_path: Path) -> None:
    few = cases[:10] + cases[PER_CLASS : PER_CLASS + 10]
    labels = write_labels(tmp_path / "labels.csv", few)
    out = tmp_path / "site.yaml"
    done = cli("recalibrate", "-c", write_config(tmp_path), "--labels", labels, "--out", out)
    assert done.returncode == 2
    assert "no overlay written" in done.stderr
    assert f"10 positive and 10 negative; at least {MIN_CASES} of each" in done.stderr
    assert not out.exists() and not list(tmp_path.glob("site.report.*"))


def test_an_overlay_for_another_model_is_refused(
    calibrated: Calibrated, model: Path, tmp_path: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """`model` is a tiny real ONNX model of another name: the cxr-lite0 overlay must not apply to it."""
    config = write_config(tmp_path, model=str(model), site_overlay=str(calibrated.overlay))
    done = cli("process", "-c", config, "--json", data.first(source="nih"))
    assert done.returncode == 2 and "was made for cxr-lite0 2.0.0" in done.stderr, done.stderr
    doctor = cli("doctor", "-c", config)
    assert doctor.returncode == 1
    assert any(x.startswith("FAIL") and " overlay " in x for x in doctor.stdout.splitlines()), doctor.stdout
    daemon = daemons(None, model, inference={"site_overlay": str(calibrated.overlay)})
    with pytest.raises(AssertionError, match="never said READY"):
        daemon.start(timeout=60)
    assert "was made for cxr-lite0" in daemon.log()


def test_an_edited_overlay_is_refused(calibrated: Calibrated, tmp_path: Path) -> None:
    edited = tmp_path / "edited.yaml"
    text = calibrated.overlay.read_text(encoding="utf-8")
    threshold = read_overlay(calibrated.overlay).thresholds["abnormal"]
    edited.write_text(text.replace(f"abnormal: {threshold}", "abnormal: 0.01"), encoding="utf-8")
    assert edited.read_text(encoding="utf-8") != text
    with pytest.raises(OverlayError, match="does not match its id"):
        read_overlay(edited)


def test_feedback_labels_recalibrate_like_the_same_labels_from_a_csv(
    calibrated: Calibrated,
    cases: list[SiteCase],
    plain_results: list[Result],
    scored: dict[Path, Result],
    extra_case: SiteCase,
    tmp_path: Path,
) -> None:
    """Verdicts that agree with the truth where the reading was right and disagree where it was wrong
    give exactly the CSV's labels, so the same point; unsure and conflicting verdicts are left out."""
    config = write_config(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        for index, (case, result) in enumerate(zip(cases, plain_results, strict=True)):
            assert journal.record_result(result)
            said_abnormal = result.triage in ("abnormal", "urgent")
            verdict = "agree" if said_abnormal == case.abnormal else "disagree"
            ack = Acknowledgement(
                message_id=result.message_id, by="dr-a", at=f"2025-01-01T10:{index:02d}:00Z", verdict=verdict
            )
            assert journal.record_ack(ack)
            if index == 0:  # a second clinician unsure: no label, and no conflict either
                unsure = ack.model_copy(update={"by": "dr-b", "verdict": "unsure"})
                assert journal.record_ack(unsure)
        extra = scored[extra_case.path]
        assert journal.record_result(extra)
        for by, verdict in (("dr-a", "agree"), ("dr-b", "disagree")):
            ack = Acknowledgement(
                message_id=extra.message_id, by=by, at="2025-01-02T10:00:00Z", verdict=verdict
            )
            assert journal.record_ack(ack)
    finally:
        journal.close()
    out = tmp_path / "site.yaml"
    done = cli("recalibrate", "-c", config, "--from-feedback", "--out", out)
    assert done.returncode == 0, done.stderr
    from_feedback = read_overlay(out)
    assert from_feedback.thresholds == read_overlay(calibrated.overlay).thresholds
    report = json.loads((tmp_path / "site.report.json").read_text(encoding="utf-8"))
    assert report["cases"]["from_feedback"] == len(cases)
    assert report["cases"]["left_out"] == {"clinicians' verdicts conflict": 1}
    assert any("biased towards the model" in c for c in report["caveats"])
    assert "clinicians' feedback" in from_feedback.source
