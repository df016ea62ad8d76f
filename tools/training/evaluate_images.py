"""Which images tools/training/evaluate.py scores, and running them through the appliance's own Analyzer
(the same assembly as `cxr-appliance process`: reader, tag gate, preprocessing, backend, decision table)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tqdm import tqdm

from appliance.assemble import build_analyzer, job_for_file
from appliance.config import AppConfig
from appliance.errors import UserError
from appliance.pipeline import Analyzer
from appliance.result import Result
from tools.training import dataset as data


def make_analyzer(model: Path, precision: str, threads: int) -> Analyzer:
    config = AppConfig.model_validate(
        {
            "inference": {
                "model": str(model),
                "backend": "onnxruntime",
                "precision": precision,
                "max_batch": 8,
                "onnxruntime": {"intra_op_threads": threads},
            },
            "mqtt": {"publish_heatmap": False},
        }
    )
    return build_analyzer(config, salt_required=False, create_salt=False)


def analyze(analyzer: Analyzer, paths: list[Path], desc: str) -> list[Result]:
    results: list[Result] = []
    for start in tqdm(range(0, len(paths), 8), desc=desc, mininterval=10):
        jobs = [job_for_file(path, source="evaluate") for path in paths[start : start + 8]]
        results += analyzer.analyze(jobs)
    return results


def choose_records(
    folder: Path, manifest_folder: Path, training: dict[str, Any], split: str
) -> tuple[list[data.Record], str]:
    records = data.load_records(folder)
    same_data = hashlib.sha256((folder / "metadata.csv").read_bytes()).hexdigest() == training.get(
        "data_metadata_sha256"
    )
    if split == "auto":
        split = "validation" if same_data else "all"
    if split == "validation":
        if not same_data:
            raise UserError(
                f"{folder}: not the model's training data, so it has no validation split (use --split all)"
            )
        patients = data.read_split(manifest_folder / "split.json")["validation"]
        records = [r for r in records if r.patient_id in patients]
    return records, split
