#!/usr/bin/env python3
"""Parity gate: a candidate backend (TensorRT engine, or an FP16/INT8 ONNX) against the FP32 ONNX.

Both run the same real images, decoded by appliance.ingest and prepared by appliance.preprocess exactly
as in the appliance: the model's validation patients (split.json) when the model has a split, else an
even spread over metadata.csv. The verdict is tools/engines/parity_gate.py, the same code as tools/engines/quantize.py
(rule and justification: docs/parity.md): per published score, |ΔAUC| <= 0.005 against the labels, a
score deviation no larger than the FP32 model's own reading noise, and no decision flip outside the
noise band around an operating point (flips inside it are counted and reported). The noise is read from
<model>/parity_noise.json, measured there when missing or made for another model or image set.

    python -m tools.engines.check_parity --config /etc/cxr-appliance/config.yaml --record   # on the Jetson
    python -m tools.engines.check_parity --model engines/cxr-lite0 --candidate onnx:int8      # anywhere

Exit codes: 0 passed, 1 failed the gate, 2 bad usage/input (message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.base import Backend
from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.backends.select import open_tensorrt
from appliance.backends.tensorrt import TensorRTBackend
from appliance.config import load_config
from appliance.engine_cache import ParityRecord, record_parity, utc_now
from appliance.errors import ApplianceError, InputRejected, UserError
from appliance.ingest import read_image
from appliance.manifest import Manifest, Precision, load_manifest
from appliance.preprocess import preprocess
from tools.engines.engine_target import add_target_arguments, load_target
from tools.engines.parity_accuracy import Truth
from tools.engines.parity_gate import judge
from tools.engines.parity_noise import Runner, load_or_measure_noise
from tools.engines.parity_report import markdown
from tools.training import dataset


@dataclass
class HeadReport:
    """One model output: the gate's figures for its scores, and what failed."""

    output: str
    role: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    images: int
    gate: dict[str, Any]
    noise: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])

    @property
    def heads(self) -> list[HeadReport]:
        """The gate's rows grouped by model output (max/mean |Δ|, ΔAUC per label, flips, failures)."""
        heads: dict[str, HeadReport] = {}
        for row in self.gate["scores"]:
            if row.get("missing"):
                continue
            head = heads.setdefault(row["output"], HeadReport(row["output"], row["key"].split(".")[0]))
            label = row["key"].split(".", 1)[-1]
            m = head.metrics
            m["max_abs"] = max(m.get("max_abs") or 0.0, row["max_abs"] or 0.0)
            m["mean_abs"] = max(m.get("mean_abs") or 0.0, row["mean_abs"] or 0.0)
            if row.get("accuracy"):
                m[f"auc_delta[{label}]" if "AUC" in row["accuracy"]["metric"] else f"delta[{label}]"] = row[
                    "accuracy"
                ]["delta"]
            for point in row["points"]:
                m[f"flips_in_band[{label}:{point['point']}]"] = point["inside_band"]
                m[f"flips_outside_band[{label}:{point['point']}]"] = point["outside_band"]
        for check in self.gate["checks"]:
            if not check["ok"]:
                key = check["check"].split(":", 1)[0]
                output = next((r["output"] for r in self.gate["scores"] if r["key"] == key), key)
                heads.setdefault(output, HeadReport(output, key)).failures.append(check["check"])
        return list(heads.values())

    def to_json(self) -> str:
        body = {
            "reference": self.reference,
            "candidate": self.candidate,
            "images": self.images,
            "passed": self.passed,
            **self.gate,
            "bands": (self.noise or {}).get("bands"),
            "band_source": (self.noise or {}).get("band_source"),
        }
        return json.dumps(body, indent=2)


def describe(backend: Backend) -> str:
    return f"{backend.name}/{backend.precision}"


def run_all(backend: Backend, inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    parts = [backend.run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def compare_backends(
    reference: Backend,
    candidate: Backend,
    manifest: Manifest,
    inputs: np.ndarray,
    records: Sequence[dataset.Record] | None = None,
    batch_size: int = 4,
    data: Path | None = None,
    run_other: Runner | None = None,
) -> ParityReport:
    """The backend-agnostic core: same inputs through both, judged by tools/engines/parity_gate.py.

    The reading noise that sets the band is measured with the reference backend on `records` (read again
    at full resolution and as re-encoded JPEG) unless <model>/parity_noise.json has it for these images."""
    ref_out = run_all(reference, inputs, batch_size)
    cand_out = run_all(candidate, inputs, batch_size)
    noise: dict[str, Any] | None = None
    known = None
    if records is not None:
        folder = data or dataset.data_dir(None)
        noise = load_or_measure_noise(
            manifest,
            folder,
            records,
            inputs,
            ref_out,
            lambda x: run_all(reference, x, batch_size),
            run_other or (lambda x: run_all(reference, x, 1)),
        )
        known = Truth.load(records, folder)
    gate = judge(manifest, ref_out, cand_out, noise, known)
    return ParityReport(describe(reference), describe(candidate), len(inputs), gate, noise)


def load_inputs(
    manifest: Manifest, data: Path, limit: int | None, offset: int = 0
) -> tuple[np.ndarray, list[dataset.Record]]:
    """Real images through the appliance's own path: the model's validation patients when its folder has
    a split.json naming patients of this data set, else an even spread over metadata.csv. At most `limit`
    (None: all), spread evenly; `offset` shifts the spread, giving a disjoint set (calibration vs parity)."""
    records = [r for r in dataset.load_records(data) if not r.is_dicom]
    if not records:
        raise UserError(f"{data}: metadata.csv lists no images")
    split_file = manifest.folder / "split.json"
    if split_file.is_file():
        validation = dataset.read_split(split_file)["validation"]
        mine = [r for r in records if r.patient_id in validation]
        if mine:
            records = mine
        else:
            print(f"{data}: none of the model's validation patients; using every image", file=sys.stderr)
    step = max(1, len(records) // limit) if limit else 1
    chosen = records[offset % step :: step][:limit] if limit else records
    samples, kept = [], []
    for record in chosen:
        try:
            image = read_image(
                data / record.file, target_size=max(manifest.input.height, manifest.input.width)
            )
        except InputRejected as exc:
            print(f"skipped {record.file}: {exc}", file=sys.stderr)
            continue
        samples.append(preprocess(image.pixels, manifest.input)[0])
        kept.append(record)
    return np.stack(samples), kept


def _candidate(spec: str, manifest: Manifest, args: argparse.Namespace) -> Backend:
    if spec.startswith("onnx:"):
        precision = Precision(spec.split(":", 1)[1])
        return OnnxRuntimeBackend(
            manifest, precision, OnnxRuntimeConfig(intra_op_threads=args.threads), args.batch
        )
    if spec != "tensorrt":
        raise UserError(f"--candidate {spec!r}: use 'tensorrt', 'onnx:fp16' or 'onnx:int8'")
    target = load_target(args)  # the same options build_engine takes: the engine it built
    config = target.config.model_copy(update={"require_parity": False})  # this IS the parity check
    return open_tensorrt(manifest, config, target.precision, target.max_batch)


def record_verdict(backend: Backend, report: ParityReport, report_path: Path) -> None:
    """Write the verdict into the engine's sidecar: the appliance loads only engines that passed."""
    if not isinstance(backend, TensorRTBackend):
        raise UserError("--record applies to TensorRT engines only (--candidate tensorrt)")
    parity = ParityRecord(
        passed=report.passed, checked_at=utc_now(), images=report.images, report=str(report_path)
    )
    record_parity(backend.engine_path.with_suffix(".json"), parity)


def _model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    if args.config:
        return load_config(Path(args.config)).inference.model
    return dataset.REPO / "engines" / "cxr-lite0"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_target_arguments(parser)
    parser.add_argument("--candidate", default="tensorrt", help="tensorrt (default), onnx:fp16 or onnx:int8")
    parser.add_argument("--data", help="real images (default $CXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--limit", type=int, help="at most this many images (default: all validation images)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the fp32 reference")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--report", help="write the JSON report here (default: next to the engine or model)")
    parser.add_argument("--record", action="store_true", help="store the verdict in the engine's sidecar")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> ParityReport:
    manifest = load_manifest(_model_path(args))
    folder = dataset.data_dir(args.data)
    inputs, records = load_inputs(manifest, folder, args.limit)
    print(f"{len(inputs)} images from {folder}")
    reference = OnnxRuntimeBackend(
        manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=args.threads), args.batch
    )
    other = OnnxRuntimeBackend(
        manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=args.threads + 1), args.batch
    )
    candidate = _candidate(args.candidate, manifest, args)
    try:
        report = compare_backends(
            reference,
            candidate,
            manifest,
            inputs,
            records,
            batch_size=args.batch,
            data=folder,
            run_other=lambda x: run_all(other, x, 1),
        )
        default_dir = getattr(candidate, "engine_path", manifest.folder / "model.onnx").parent
        report_path = (
            Path(args.report)
            if args.report
            else default_dir / f"parity-{args.candidate.replace(':', '-')}.json"
        )
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(report.to_json() + "\n", encoding="utf-8")
        report_path.with_suffix(".md").write_text(
            markdown(report.gate, f"Parity gate: {report.candidate} vs {report.reference}", report.noise),
            encoding="utf-8",
        )
        if args.record:
            record_verdict(candidate, report, report_path)
    finally:
        candidate.close()
        other.close()
        reference.close()
    for row in report.gate["scores"]:
        if row.get("missing"):
            print(f"  {row['key']}: output missing  FAIL")
            continue
        acc = row.get("accuracy")
        flips = ", ".join(
            f"{p['point']} {p['inside_band']} in band / {p['outside_band']} outside" for p in row["points"]
        )
        print(
            f"  {row['key']}{'' if row['gated'] else ' (not published)'}: max |Δ| {row['max_abs']:.4f}"
            f" mean {row['mean_abs']:.4f} p99 {row['p99_abs']:.4f} (band {row['band']:.4f})"
            + (f", |Δ{acc['metric']}| {acc['delta']:.4f}" if acc else "")
            + (f", flips {flips}" if flips else "")
            + ("" if row["ok"] or not row["gated"] else "  FAIL")
        )
    print(
        f"parity {'PASSED' if report.passed else 'FAILED'}: {report.candidate} vs {report.reference}; report {report_path}"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return 0 if check(args).passed else 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ApplianceError as exc:  # BackendUnavailable: no TensorRT/engine here
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
