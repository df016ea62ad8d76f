"""Shared data helpers for the cxr-lite0 tools: metadata, labels, patient split, image reading, negatives.

Every image goes through appliance.preprocess with the model's InputSpec, exactly as in the appliance.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from appliance.errors import InputRejected, UserError
from appliance.manifest import InputSpec
from appliance.preprocess import fit, preprocess

REPO = Path(__file__).resolve().parents[2]
INPUT_SPEC = InputSpec(
    name="image",
    layout="NCHW",
    channels=1,
    height=256,
    width=256,
    aspect="letterbox",
    pad_value=0.0,
    intensity={"range": (-1.0, 1.0)},  # pydantic coerces the dict
)
MASK_SIZE = 64
FRONTAL_VIEWS = {"PA", "AP", "AP Supine"}
# Cohen laterals whose view column is blank (visual check recorded in the data README).
BLANK_VIEW_LATERALS = {
    "959dea122c905d6581f71b4a000bbb_jumbo-2.jpg",
    "f5c69a3d9dcf2d5d4e54d0d080b666_jumbo.jpg",
}
# The second file of each known duplicate pair (data README): dropped so no picture counts twice.
DUPLICATE_FILES = {
    "images/cohen/16660_2_1.jpg",
    "images/cohen/16660_3_1.jpg",
    "images/cohen/16660_4_1.jpg",
    "images/cohen/16660_5_1.jpg",
    "images/cohen/case_72_RX-TORACE1.jpg",
    "images/cohen/case_76_1-3.png",
    "images/cohen/extubation-1.jpg",
    "images/cohen/81ba2932af55c7663e9d87016776a6_jumbo-1.jpg",
    "images/figure1/COVID-00037.jpg",
    "images/figure1/COVID-00022.jpg",
    "images/txv/covid-19-pneumonia-58-prior.jpg",
}
VIEW_FRONTAL, VIEW_LATERAL, VIEW_NOT_CXR, UNKNOWN = 0, 1, 2, -1
# Independent (multi-label, sigmoid) findings: every label the data supports with enough examples.
# "No finding" is not a head of its own: the reading says it only from triage (appliance.interpret.decisions).
FINDING_LABELS = [
    "COVID-19",
    "Pneumonia",
    "Nodule",
    "Infiltration",
    "Atelectasis",
    "Effusion",
    "Edema",
    "Consolidation",
]
FINDING_INDEX = {"No Finding": 0, "COVID-19": 1, "Pneumonia": 2}
ABNORMAL_FINDINGS = {"COVID-19", "Pneumonia", "Nodule", "Tuberculosis", "Cardiomegaly"}
# Findings whose presence or absence the NIH "Finding Labels" state for every NIH image (text-mined).
NIH_SOURCES = {"nih"}


BUNDLED_MODEL = REPO / "engines" / "cxr-lite0"


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--model (a model folder, the bundled one by default) and --data, as every model tool takes them."""
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="model folder")
    parser.add_argument("--data", help="data folder (default $CXR_DATA or ../shared/data/cxr)")


def data_dir(cli_value: str | None = None) -> Path:
    """--data, else $CXR_DATA, else <repo>/../shared/data/cxr."""
    path = Path(cli_value or os.environ.get("CXR_DATA") or REPO.parent / "shared" / "data" / "cxr")
    if not (path / "metadata.csv").is_file():
        raise UserError(f"{path}: no metadata.csv here (set --data or CXR_DATA to the data folder)")
    return path


@dataclass(frozen=True)
class Record:
    file: str
    patient_id: str
    modality: str
    view: int  # VIEW_* or UNKNOWN
    finding: int  # FINDING_INDEX or UNKNOWN
    abnormal: int  # 1/0 or UNKNOWN
    extent: float  # nan when not scored
    opacity: float
    adverse: int  # 1/0 or UNKNOWN
    mask_file: str
    finding_name: str
    source: str = ""
    labels: tuple[int, ...] = ()  # one of 1 / 0 / UNKNOWN per FINDING_LABELS
    heart_mask_file: str = ""

    @property
    def is_cxr(self) -> bool:
        return self.modality == "X-ray"

    @property
    def is_dicom(self) -> bool:
        return self.file.lower().endswith((".dcm", ".dicom"))


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _adverse(row: dict[str, str]) -> int:
    """Death, ICU or intubation -> 1; every known outcome negative -> 0; nothing known -> unknown."""
    events = {"survival": "N", "went_icu": "Y", "intubated": "Y"}
    known = [row.get(col, "") for col in events if row.get(col, "") in ("Y", "N")]
    if any(row.get(col, "") == bad for col, bad in events.items()):
        return 1
    return 0 if known else UNKNOWN


def _view(row: dict[str, str]) -> int:
    if row["modality"] != "X-ray":
        return VIEW_NOT_CXR
    if row["view"] in FRONTAL_VIEWS:
        return VIEW_FRONTAL
    if row["view"] == "L" or Path(row["file"]).name in BLANK_VIEW_LATERALS:
        return VIEW_LATERAL
    return UNKNOWN


def finding_targets(row: dict[str, str], labels: list[str]) -> tuple[int, ...]:
    """Multi-label targets: what the source states is 1 or 0, everything else UNKNOWN (masked in the loss).

    A "No Finding" image is negative for every label; COVID-19 and other pneumonia exclude each other
    (the data's "Pneumonia" means every infection but COVID-19); NIH images carry all their co-labels.
    """
    finding = row["finding"]
    target = dict.fromkeys(labels, UNKNOWN)
    if row["modality"] != "X-ray" or finding in ("todo", "unknown", ""):
        return tuple(target.values())
    if finding == "No Finding":
        target = dict.fromkeys(labels, 0)
    elif finding == "COVID-19":
        target.update({"COVID-19": 1, "Pneumonia": 0})
    elif finding == "Pneumonia":
        target.update({"COVID-19": 0, "Pneumonia": 1})
    elif finding == "Nodule":
        target.update({"COVID-19": 0, "Pneumonia": 0, "Nodule": 1})
    else:  # Tuberculosis, Cardiomegaly: taken before COVID-19 existed or not an infection we name
        target.update({"COVID-19": 0})
    if row.get("source") in NIH_SOURCES:
        stated = set(row.get("finding_raw", "").split("|"))
        for label in labels:
            if label != "COVID-19":
                target[label] = int(label in stated)
    return tuple(target[label] for label in labels)


def load_records(data: Path, dedupe: bool = True) -> list[Record]:
    path = data / "metadata.csv"
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read metadata: {exc}") from exc
    required = {"file", "patient_id", "modality", "view", "finding"}
    if rows and not required <= set(rows[0]):
        raise UserError(f"{path}: missing columns {sorted(required - set(rows[0]))}")
    records = []
    for row in rows:
        if dedupe and row["file"] in DUPLICATE_FILES:
            continue
        finding = row["finding"]
        cxr = row["modality"] == "X-ray"
        abnormal = 1 if finding in ABNORMAL_FINDINGS else 0 if finding == "No Finding" else UNKNOWN
        records.append(
            Record(
                file=row["file"],
                patient_id=row["patient_id"],
                modality=row["modality"],
                view=_view(row),
                finding=FINDING_INDEX.get(finding, UNKNOWN) if cxr else UNKNOWN,
                abnormal=abnormal if cxr else UNKNOWN,
                extent=_float(row.get("severity_geographic", "")),
                opacity=_float(row.get("severity_opacity", "")),
                adverse=_adverse(row) if cxr else UNKNOWN,
                mask_file=row.get("mask_file", "") or "",
                finding_name=finding,
                source=row.get("source", ""),
                labels=finding_targets(row, FINDING_LABELS),
                heart_mask_file=row.get("heart_mask_file", "") or "",
            )
        )
    return records


def split_patients(records: list[Record], seed: int, validation: float = 0.25) -> dict[str, list[str]]:
    """Seeded patient-level split, stratified so rare groups (normals, laterals, CT) land on both sides."""
    strata: dict[tuple[str, ...], set[str]] = {}
    by_patient: dict[str, list[Record]] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record)
    for patient, recs in by_patient.items():
        key = (
            "ct" if any(not r.is_cxr for r in recs) else "xr",
            "normal" if any(r.finding == 0 for r in recs) else "",
            "lateral" if any(r.view == VIEW_LATERAL for r in recs) else "",
            "severity" if any(not math.isnan(r.extent) for r in recs) else "",
            "pneumonia" if any(r.finding == 2 for r in recs) else "",
        )
        strata.setdefault(key, set()).add(patient)
    rng = random.Random(seed)
    split: dict[str, list[str]] = {"train": [], "validation": []}
    for stratum in sorted(strata):
        patients = sorted(strata[stratum])
        rng.shuffle(patients)
        n_val = round(len(patients) * validation)
        split["validation"] += patients[:n_val]
        split["train"] += patients[n_val:]
    return {name: sorted(ids) for name, ids in split.items()}


def write_split(path: Path, split: dict[str, list[str]], seed: int) -> None:
    path.write_text(json.dumps({"seed": seed, **split}, indent=1) + "\n")


def read_split(path: Path) -> dict[str, set[str]]:
    try:
        content = json.loads(path.read_text())
        return {"train": set(content["train"]), "validation": set(content["validation"])}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot read the patient split: {exc}") from exc


def read_pixels(path: Path, spec: InputSpec = INPUT_SPEC) -> np.ndarray:
    """Decode an image file to float32 (H, W) in [0, 1] as the appliance does (appliance.ingest.read_image,
    with the pipeline's target size so JPEGs are DCT-reduced the same way); Pillow until ingest exists."""
    if dicom_supported():
        from appliance.ingest import read_image

        try:
            return read_image(path, target_size=max(spec.height, spec.width)).pixels
        except InputRejected as exc:
            raise UserError(f"{path}: {exc}") from exc
    if path.suffix.lower() in (".dcm", ".dicom", ""):
        raise UserError(f"{path}: DICOM reading needs appliance.ingest.read_image (not available yet)")
    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read image: {exc}") from exc
    return np.asarray(grey, dtype=np.float32) / 255.0


def dicom_supported() -> bool:
    try:
        from appliance.ingest import read_image  # noqa: F401
    except ImportError:
        return False
    return True


def tensor(pixels: np.ndarray, spec: InputSpec = INPUT_SPEC) -> np.ndarray:
    return preprocess(pixels, spec)[0]


def mask_target(path: Path, spec: InputSpec = INPUT_SPEC) -> np.ndarray:
    """Lung mask letterboxed like its image, area-reduced to MASK_SIZE: soft target in [0, 1]."""
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    canvas, _ = fit(mask, spec.model_copy(update={"pad_value": 0.0}))
    small = Image.fromarray(canvas, mode="F").resize((MASK_SIZE, MASK_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


# --- Generated "not a chest X-ray" images --------------------------------------------------------

NEGATIVE_KINDS = ["inverted", "flat", "noise", "gradient", "document", "scene"]


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(200, 900)), int(rng.integers(200, 900))


def negative_image(kind: str, rng: np.random.Generator, cxr: np.ndarray | None = None) -> np.ndarray:
    """One synthetic non-CXR picture, float32 (H, W) in [0, 1]. `inverted` needs a CXR to invert."""
    h, w = _random_size(rng)
    if kind == "inverted":
        if cxr is None:
            raise ValueError("inverted negatives need a chest X-ray")
        return (1.0 - cxr).astype(np.float32)
    if kind == "flat":
        return np.full((h, w), rng.uniform(0, 1), dtype=np.float32)
    if kind == "noise":
        scale = int(rng.integers(1, 16))
        small = rng.random((max(1, h // scale), max(1, w // scale))).astype(np.float32)
        noisy = Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(noisy, dtype=np.float32), 0, 1)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = np.cos(angle) * xx / w + np.sin(angle) * yy / h
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
        return (ramp ** rng.uniform(0.3, 3.0)).astype(np.float32)
    image = Image.new(
        "L", (w, h), int(rng.integers(180, 256)) if kind == "document" else int(rng.integers(0, 256))
    )
    draw = ImageDraw.Draw(image)
    if kind == "document":
        words = [
            "Patient",
            "report",
            "the",
            "chest",
            "invoice",
            "total",
            "date",
            "name",
            "X-ray",
            "lorem",
            "ipsum",
        ]
        y = int(rng.integers(5, 30))
        while y < h - 10:
            line = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(3, 12))))
            draw.text((int(rng.integers(5, 40)), y), line, fill=int(rng.integers(0, 90)))
            y += int(rng.integers(10, 22))
    elif kind == "scene":
        for _ in range(int(rng.integers(5, 25))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=int(rng.integers(0, 256)))
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 4))))
    else:
        raise ValueError(f"unknown negative kind {kind!r}")
    return np.asarray(image, dtype=np.float32) / 255.0


def negative_set(count: int, seed: int, cxr_files: list[Path]) -> list[tuple[str, np.ndarray]]:
    """`count` generated negatives (kinds in turn), each preprocessed to the model input."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        kind = NEGATIVE_KINDS[index % len(NEGATIVE_KINDS)]
        if kind == "inverted" and not cxr_files:
            kind = "noise"
        source = read_pixels(cxr_files[int(rng.integers(0, len(cxr_files)))]) if kind == "inverted" else None
        out.append((kind, tensor(negative_image(kind, rng, source))))
    return out


def package_images() -> list[Path]:
    """Non-medical PNG/JPEG files shipped inside installed packages (test baselines, sample data)."""
    import site

    found: list[Path] = []
    for root in {Path(p) for p in site.getsitepackages()}:
        for pattern in ("*/**/*.png", "*/**/*.jpg"):
            found += [p for p in root.glob(pattern) if p.stat().st_size > 2000]
    return sorted(found)[:200]
