"""The images and pairs of tools/training/train_sequence_risk.py: frontal X-rays with an offset and a known
outcome of patients that have two or more, read by the appliance's own Analyzer, and each read image
paired with the patient's most recent strictly earlier read image (as the daemon links them)."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tqdm import tqdm

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.manifest import Manifest, Precision
from appliance.pipeline import Analyzer, Job
from appliance.result import Result
from tools.training import dataset as data

# Offsets become acquisition times so the appliance's own interval code sees real datetimes.
EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)


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
