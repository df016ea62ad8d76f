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
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.config import AppConfig
from appliance.errors import ManifestError, UserError
from appliance.interpret.sequence_risk import features, image_risk, probability
from appliance.manifest import Manifest, Precision, SequenceFeature, SequenceRisk, load_manifest
from appliance.pipeline import Analyzer, Job
from appliance.result import Result
from tools.training import dataset as data
from tools.training import metrics

FEATURES: list[SequenceFeature] = ["risk_logit", "risk_logit_change", "extent", "extent_change", "log_days"]
LAMBDAS = [0.3, 1.0, 3.0, 10.0, 30.0, 100.0]  # L2 strengths tried (standardised features)
FOLDS = 5
SEED = 0
# Offsets become acquisition times so the appliance's own interval code sees real datetimes.
EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)
REPORT = "sequence_risk_report"


@dataclass(frozen=True)
class Image:
    file: str
    patient: str
    offset_days: float
    adverse: int
    split: str


@dataclass(frozen=True)
class Pair:
    image: Image
    prior_image: Image
    current: Result
    prior: Result

    @property
    def patient(self) -> str:
        return self.image.patient

    @property
    def adverse(self) -> int:
        return self.image.adverse

    @property
    def split(self) -> str:
        return self.image.split


def offsets(folder: Path) -> dict[str, float]:
    """offset_days per file (dataset.Record has no such column)."""
    with (folder / "metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "offset_days" not in rows[0]:
        raise UserError(f"{folder / 'metadata.csv'}: no offset_days column")
    out = {}
    for row in rows:
        try:
            out[row["file"]] = float(row["offset_days"])
        except ValueError:
            continue
    return out


def select(folder: Path, split: dict[str, set[str]], smoke: int | None) -> list[Image]:
    """Frontal X-rays with offset and outcome, of patients that have at least two of them."""
    known = offsets(folder)
    by_patient: dict[str, list[Image]] = defaultdict(list)
    for record in data.load_records(folder):
        if record.view != data.VIEW_FRONTAL or record.adverse == data.UNKNOWN or record.file not in known:
            continue
        side = next((name for name, ids in split.items() if record.patient_id in ids), None)
        if side is None:
            continue
        by_patient[record.patient_id].append(
            Image(record.file, record.patient_id, known[record.file], record.adverse, side)
        )
    chosen: list[Image] = []
    for side in ("train", "validation"):
        patients = sorted(p for p, imgs in by_patient.items() if len(imgs) >= 2 and imgs[0].split == side)
        if smoke is not None:
            patients = patients[:smoke]
        chosen += [img for p in patients for img in sorted(by_patient[p], key=lambda i: i.offset_days)]
    if not chosen:
        raise UserError(f"{folder}: no patient has two frontal images with offsets and an outcome")
    return chosen


def read_all(manifest: Manifest, folder: Path, images: list[Image], threads: int) -> dict[str, Result]:
    """Each image through the appliance's Analyzer; results get synthetic acquisition times from offsets."""
    backend = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=threads), 8)
    config = AppConfig.model_validate({"mqtt": {"publish_heatmap": False}})
    analyzer = Analyzer(config, manifest, backend)
    results: dict[str, Result] = {}
    try:
        for start in tqdm(range(0, len(images), 8), desc="images", unit="batch"):
            chunk = images[start : start + 8]
            jobs = [
                Job(
                    path=folder / img.file, image_id=hashlib.sha256(img.file.encode()).hexdigest(), source="x"
                )
                for img in chunk
            ]
            for img, result in zip(chunk, analyzer.analyze(jobs), strict=True):
                when = (EPOCH + timedelta(days=img.offset_days)).isoformat()
                info = result.image.model_copy(update={"acquired_at": when})
                results[img.file] = result.model_copy(update={"image": info, "patient_key": img.patient})
    finally:
        backend.close()
    return results


def make_pairs(images: list[Image], results: dict[str, Result]) -> list[Pair]:
    """(current, most recent strictly earlier read image) per read image; same-day images have no order."""
    by_patient: dict[str, list[Image]] = defaultdict(list)
    for img in images:
        if results[img.file].status == "ok":
            by_patient[img.patient].append(img)
    pairs = []
    for imgs in by_patient.values():
        for img in imgs:
            earlier = [p for p in imgs if p.offset_days < img.offset_days]
            if earlier:
                prior = max(earlier, key=lambda p: (p.offset_days, p.file))
                pairs.append(Pair(img, prior, results[img.file], results[prior.file]))
    return pairs


# --- the model: L2 logistic regression by Newton steps (numpy only) ---------------------------------


@dataclass(frozen=True)
class Fitted:
    mean: np.ndarray
    scale: np.ndarray
    coefficients: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Training-side probability; the appliance recomputes it from the manifest's numbers."""
        z = (x - self.mean) / self.scale
        return np.asarray(1.0 / (1.0 + np.exp(-(z @ self.coefficients + self.intercept))))


def fit(x: np.ndarray, y: np.ndarray, lam: float) -> Fitted:
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-9] = 1.0
    design = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
    penalty = np.diag([0.0] + [lam] * x.shape[1])  # the intercept is not shrunk
    w = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-design @ w))
        gradient = design.T @ (p - y) + penalty @ w
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Fitted(mean, scale, w[1:].copy(), float(w[0]))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, lam: float) -> np.ndarray:
    """Patient-grouped K-fold predictions (every patient's pairs held out together)."""
    patients = np.unique(groups)
    np.random.default_rng(SEED).shuffle(patients)
    fold_of = {p: i % FOLDS for i, p in enumerate(patients)}
    folds = np.array([fold_of[g] for g in groups])
    pred = np.full(len(y), np.nan)
    for k in range(FOLDS):
        held = folds == k
        if held.any() and len(np.unique(y[~held])) == 2:
            pred[held] = fit(x[~held], y[~held], lam).predict(x[held])
    return pred


def matrix(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels, patient groups, single-image risk; pairs missing a feature are dropped."""
    rows, ys, groups, single = [], [], [], []
    for pair in pairs:
        vector = features(pair.current, pair.prior, FEATURES)
        own = image_risk(pair.current)
        if vector is None or own is None:
            continue
        rows.append(vector)
        ys.append(pair.adverse)
        groups.append(pair.patient)
        single.append(own)
    x = np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES))
    return x, np.array(ys, dtype=np.float64), np.array(groups), np.array(single, dtype=np.float64)


# --- report ---------------------------------------------------------------------------------------


def parity_checks(pairs: list[Pair], model: Fitted, n: int = 3) -> list[dict[str, Any]]:
    """A few real pairs with the training-side probability, for the appliance-side parity test."""
    checks = []
    for pair in pairs:
        vector = features(pair.current, pair.prior, FEATURES)
        if vector is None:
            continue
        checks.append(
            {
                "current": pair.image.file,
                "current_offset_days": pair.image.offset_days,
                "prior": pair.prior_image.file,
                "prior_offset_days": pair.prior_image.offset_days,
                "probability": float(model.predict(vector[None])[0]),
            }
        )
        if len(checks) == n:
            break
    return checks


def counts(images: list[Image], results: dict[str, Result], pairs: list[Pair], side: str) -> dict[str, int]:
    imgs = [i for i in images if i.split == side]
    side_pairs = [p for p in pairs if p.split == side]
    return {
        "patients": len({i.patient for i in imgs}),
        "positive_patients": len({i.patient for i in imgs if i.adverse == 1}),
        "images": len(imgs),
        "images_not_read": sum(results[i.file].status != "ok" for i in imgs),
        "pairs": len(side_pairs),
        "pair_patients": len({p.patient for p in side_pairs}),
        "positive_pairs": sum(p.adverse for p in side_pairs),
    }


def auc_with_ci(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    return {
        "auc": metrics.auc(y, score),
        "ci95": metrics.bootstrap_ci(groups, lambda idx: metrics.auc(y[idx], score[idx]), n_boot=2000),
    }


def compare(y: np.ndarray, single: np.ndarray, sequence: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    def difference(idx: np.ndarray) -> float | None:
        a, b = metrics.auc(y[idx], sequence[idx]), metrics.auc(y[idx], single[idx])
        return None if a is None or b is None else a - b

    return {
        "pairs": len(y),
        "patients": len(np.unique(groups)),
        "single_image": auc_with_ci(y, single, groups),
        "sequence": auc_with_ci(y, sequence, groups),
        "difference": {
            "auc": difference(np.arange(len(y))),
            "ci95": metrics.bootstrap_ci(groups, difference, n_boot=2000),
        },
    }


MIN_VALIDATION_PATIENTS = 20


def decide(validation: dict[str, Any], smoke: bool) -> tuple[bool, str]:
    seq, single = validation["sequence"]["auc"], validation["single_image"]["auc"]
    if smoke:
        return False, "smoke run: too few patients for any decision"
    if seq is None or single is None:
        return False, "validation pairs lack one outcome class, so no AUC can be compared"
    patients = validation["patients"]
    if patients < MIN_VALIDATION_PATIENTS:
        # A tie on a handful of patients says nothing; the text would claim "using earlier images" for
        # a model that has not shown it adds anything.
        return False, (
            f"only {patients} validation patients have an image with a prior (need {MIN_VALIDATION_PATIENTS}):"
            f" sequence AUC {seq:.3f} vs single-image {single:.3f}, difference interval"
            f" {_ci(validation['difference']['ci95'])} — too little evidence; the single-image risk stays"
        )
    ci = validation["difference"]["ci95"]
    if ci is not None and ci[0] > 0:
        return True, (
            f"validation AUC {seq:.3f} > single-image {single:.3f} and the difference's interval {_ci(ci)}"
            " excludes no change: the sequence risk beats the single-image risk"
        )
    # "Off unless it beats": a tie, or a lead whose interval still includes no change, keeps the
    # single-image risk, so "using earlier images" is never claimed for a model that adds nothing shown.
    return False, (
        f"validation AUC {seq:.3f} vs single-image {single:.3f}, difference interval {_ci(ci)}: not shown"
        " to beat the single-image risk, which stays"
    )


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _auc(entry: dict[str, Any]) -> str:
    return f"{_num(entry['auc'])} {_ci(entry['ci95'])}"


def markdown(report: dict[str, Any]) -> str:
    v, t = report["validation"], report["data"]
    lines = [
        f"# Sequence-aware deterioration risk ({report['model']['name']} {report['model']['version']})",
        "",
        "Not for diagnostic use. Research demonstration on a very small public data set.",
        "",
        "| | train | validation |",
        "|---|---|---|",
        *(
            f"| {key.replace('_', ' ')} | {t['train'][key]} | {t['validation'][key]} |"
            for key in (
                "patients",
                "positive_patients",
                "images",
                "images_not_read",
                "pairs",
                "pair_patients",
                "positive_pairs",
            )
        ),
        "",
        f"Features: {', '.join(report['features'])}; L2 strength {report['lambda']} (grouped {FOLDS}-fold CV "
        f"on train); operating point {report['threshold']:.4f} (Youden on out-of-fold train predictions).",
        "",
        f"## Validation: {v['pairs']} images with a prior, {v['patients']} patients (95 % patient bootstrap)",
        "",
        "| risk | AUC [95 % CI] |",
        "|---|---|",
        f"| single-image | {_auc(v['single_image'])} |",
        f"| sequence | {_auc(v['sequence'])} |",
        f"| difference (sequence - single) | {_auc(v['difference'])} |",
        "",
        f"Train, for context: single-image AUC {_num(report['train']['single_image_auc'])} is in-sample for "
        "the image model (it was trained on these patients); sequence out-of-fold AUC "
        f"{_num(report['train']['sequence_oof_auc'])}.",
        "",
        f"## Decision: {'enabled' if report['decision']['enabled'] else 'not enabled'}",
        "",
        report["decision"]["reason"] + ".",
        "",
        "Images not read were refused by the image model's gate (mostly its out-of-distribution guard on "
        "figure-style pictures); a pair needs two read images, as in the daemon's journal.",
        "",
        "Caveats: the outcome is per patient, not per image, so all images of a patient share a label; the "
        "image model's risk on train patients is optimistic, which can make the fit lean on it; with so "
        "few validation patients the intervals are wide and a different split could reverse the ranking.",
        "",
    ]
    return "\n".join(lines)


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
    parser.add_argument(
        "--model", type=Path, default=data.REPO / "engines" / "cxr-lite0", help="model folder"
    )
    parser.add_argument("--data", help="data folder (default $CXR_DATA or ../shared/data/cxr)")
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
        f"validation: {v['pairs']} pairs / {v['patients']} patients; single-image AUC {_auc(v['single_image'])},"
        f" sequence AUC {_auc(v['sequence'])}; {'enabled' if report['decision']['enabled'] else 'not enabled'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
