#!/usr/bin/env python3
"""Parity gate: a candidate backend (TensorRT engine, or an FP16/INT8 ONNX) against the FP32 ONNX.

Both run the same real images, decoded by appliance.ingest and prepared by appliance.preprocess
exactly as in the appliance. The gate uses the INT8 quantisation gate's tolerances, per head:

  classification heads (findings, abnormal, view, risk, ood)
      |AUC(candidate) - AUC(reference)| <= 0.005 for every label that has ground truth in
      metadata.csv, and decisions at the manifest's operating points agree on >= 99% of images
  severity heads      mean |Δvalue| <= 0.1 per label (e.g. extent 0-8)
  heatmap / lung_mask mean |Δ| <= 0.05 after activation (this gate's own choice; maps have no AUC)
  embedding           reported only

    python tools/check_parity.py --config /etc/cxr-appliance/config.yaml --record   # on the Jetson
    python tools/check_parity.py --model engines/cxr-lite0 --candidate onnx:int8      # anywhere

Exit codes: 0 passed, 1 failed the gate, 2 bad usage/input (message, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.backends.base import Backend
from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.backends.select import open_tensorrt
from appliance.backends.tensorrt import TensorRTBackend, TensorRTConfig
from appliance.config import load_config
from appliance.engine_cache import ParityRecord, record_parity, utc_now
from appliance.errors import ApplianceError, InputRejected, UserError
from appliance.ingest import read_image
from appliance.interpret.activation import activate
from appliance.manifest import Manifest, OutputSpec, Precision, Role, load_manifest
from appliance.preprocess import preprocess
from tools import cxrdata, cxrmetrics

CLASSIFICATION = {Role.findings, Role.abnormal, Role.view, Role.risk, Role.ood}
MAPS = {Role.heatmap, Role.lung_mask, Role.heart_mask}


@dataclass(frozen=True)
class Tolerances:
    auc_delta: float = 0.005
    severity_mean_abs: float = 0.1
    decision_agreement: float = 0.99
    map_mean_abs: float = 0.05


@dataclass
class HeadReport:
    output: str
    role: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    reference: str
    candidate: str
    images: int
    heads: list[HeadReport]
    tolerances: Tolerances

    @property
    def passed(self) -> bool:
        return not any(head.failures for head in self.heads)

    def to_json(self) -> str:
        body = asdict(self)
        body["passed"] = self.passed
        return json.dumps(body, indent=2)


def describe(backend: Backend) -> str:
    return f"{backend.name}/{backend.precision}"


def run_all(backend: Backend, inputs: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    parts = [backend.run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _decisions(spec: OutputSpec, manifest: Manifest, values: np.ndarray) -> np.ndarray:
    """(N, labels) booleans at the manifest's operating points; softmax heads decide by argmax."""
    if spec.activation == "softmax":
        return np.eye(values.shape[1], dtype=bool)[values.argmax(axis=1)]
    labels = spec.labels or [spec.role.value]
    default = manifest.triage.abnormal_threshold if spec.role is Role.abnormal else None
    thresholds = [spec.thresholds.get(label, default if default is not None else 0.5) for label in labels]
    return values >= np.asarray(thresholds, dtype=np.float32)


def truth(spec: OutputSpec, label: str, record: cxrdata.Record) -> int | None:
    """Ground truth for one output column from metadata.csv, when the data set knows it."""
    name = label.lower()
    if spec.role is Role.abnormal:
        return None if record.abnormal == cxrdata.UNKNOWN else record.abnormal
    if spec.role is Role.ood:
        return int(not record.is_cxr)
    if spec.role is Role.view:
        wanted = {"lateral": cxrdata.VIEW_LATERAL, "frontal": cxrdata.VIEW_FRONTAL}.get(
            name, cxrdata.VIEW_NOT_CXR
        )
        return None if record.view == cxrdata.UNKNOWN else int(record.view == wanted)
    if spec.role is Role.findings and label in cxrdata.FINDING_LABELS and record.labels:
        value = record.labels[cxrdata.FINDING_LABELS.index(label)]
        return None if value == cxrdata.UNKNOWN else value
    if spec.role is Role.findings:
        known = {f.lower() for f in (*cxrdata.FINDING_INDEX, *cxrdata.ABNORMAL_FINDINGS)}
        if name not in known or not record.is_cxr or record.finding_name.lower() not in known:
            return None
        return int(record.finding_name.lower() == name)
    return None


def compare_head(
    spec: OutputSpec,
    manifest: Manifest,
    reference: np.ndarray,
    candidate: np.ndarray,
    records: Sequence[cxrdata.Record] | None,
    tol: Tolerances,
) -> HeadReport:
    report = HeadReport(spec.name, spec.role.value)
    ref = activate(spec, reference)
    cand = activate(spec, candidate)
    if ref.shape != cand.shape:
        report.failures.append(f"shape {cand.shape} != reference {ref.shape}")
        return report
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    mean_abs = float(diff.mean())
    report.metrics["max_abs"] = float(diff.max())
    report.metrics["mean_abs"] = mean_abs
    if spec.role in CLASSIFICATION:
        ref2, cand2 = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
        agree = float(
            (_decisions(spec, manifest, ref2) == _decisions(spec, manifest, cand2)).all(axis=1).mean()
        )
        report.metrics["decision_agreement"] = agree
        if agree < tol.decision_agreement:
            report.failures.append(f"decisions agree on {agree:.1%} of images < {tol.decision_agreement:.0%}")
        for column, label in enumerate(spec.labels or [spec.role.value]):
            if records is None:
                continue
            known = [(i, t) for i, r in enumerate(records) if (t := truth(spec, label, r)) is not None]
            labels = np.asarray([t for _, t in known])
            rows = np.asarray([i for i, _ in known], dtype=int)
            auc_ref = cxrmetrics.auc(labels, ref2[rows, column]) if len(rows) else None
            auc_cand = cxrmetrics.auc(labels, cand2[rows, column]) if len(rows) else None
            report.metrics[f"auc[{label}]"] = auc_ref
            if auc_ref is None or auc_cand is None:
                continue
            delta = abs(auc_ref - auc_cand)
            report.metrics[f"auc_delta[{label}]"] = delta
            if delta > tol.auc_delta:
                report.failures.append(f"{label}: ΔAUC {delta:.4f} > {tol.auc_delta}")
    elif spec.role is Role.severity:
        per_label = diff.reshape(len(diff), -1).mean(axis=0)
        names = spec.labels or [f"{spec.role.value}{i}" for i in range(len(per_label))]
        for label, value in zip(names, per_label, strict=True):
            report.metrics[f"mean_abs[{label}]"] = float(value)
            if value > tol.severity_mean_abs:
                report.failures.append(f"{label}: mean |Δ| {value:.3f} > {tol.severity_mean_abs}")
    elif spec.role in MAPS and mean_abs > tol.map_mean_abs:
        report.failures.append(f"mean |Δ| {mean_abs:.3f} > {tol.map_mean_abs}")
    return report


def compare_backends(
    reference: Backend,
    candidate: Backend,
    manifest: Manifest,
    inputs: np.ndarray,
    records: Sequence[cxrdata.Record] | None = None,
    tolerances: Tolerances | None = None,
    batch_size: int = 4,
) -> ParityReport:
    """The backend-agnostic core: same inputs through both, every manifest output judged by its role."""
    tol = tolerances or Tolerances()
    ref_out = run_all(reference, inputs, batch_size)
    cand_out = run_all(candidate, inputs, batch_size)
    heads = []
    for spec in manifest.outputs:
        if spec.name not in cand_out:
            heads.append(
                HeadReport(spec.name, spec.role.value, failures=["output missing from the candidate"])
            )
            continue
        heads.append(compare_head(spec, manifest, ref_out[spec.name], cand_out[spec.name], records, tol))
    return ParityReport(describe(reference), describe(candidate), len(inputs), heads, tol)


def load_inputs(
    manifest: Manifest, data: Path, limit: int, offset: int = 0
) -> tuple[np.ndarray, list[cxrdata.Record]]:
    """Up to `limit` real images, spread evenly over metadata.csv, through the appliance's own path.

    `offset` shifts the even spread, giving a disjoint set (e.g. calibration vs parity images)."""
    records = [r for r in cxrdata.load_records(data) if not r.is_dicom]
    if not records:
        raise UserError(f"{data}: metadata.csv lists no images")
    step = max(1, len(records) // limit)
    chosen = records[offset % step :: step][:limit]
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
        return OnnxRuntimeBackend(manifest, precision, OnnxRuntimeConfig(), args.batch)
    if spec != "tensorrt":
        raise UserError(f"--candidate {spec!r}: use 'tensorrt', 'onnx:fp16' or 'onnx:int8'")
    config = _tensorrt_config(args).model_copy(update={"require_parity": False})  # this IS the parity check
    return open_tensorrt(manifest, config)


def _tensorrt_config(args: argparse.Namespace) -> TensorRTConfig:
    config = load_config(Path(args.config)).inference.tensorrt if args.config else TensorRTConfig()
    if args.cache:
        config = config.model_copy(update={"engine_cache": Path(args.cache)})
    return config


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
    return cxrdata.REPO / "engines" / "cxr-lite0"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="appliance config YAML (model and inference.tensorrt)")
    parser.add_argument(
        "--model", help="model manifest or its folder (default: the config's, else cxr-lite0)"
    )
    parser.add_argument("--candidate", default="tensorrt", help="tensorrt (default), onnx:fp16 or onnx:int8")
    parser.add_argument("--cache", help="engine cache folder (default: the config's, else <model>/cache)")
    parser.add_argument("--data", help="real images (default $CXR_DATA, else ../shared/data/cxr)")
    parser.add_argument("--limit", type=int, default=200, help="images to compare (default 200)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--report", help="write the JSON report here (default: next to the engine or model)")
    parser.add_argument("--record", action="store_true", help="store the verdict in the engine's sidecar")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> ParityReport:
    manifest = load_manifest(_model_path(args))
    inputs, records = load_inputs(manifest, cxrdata.data_dir(args.data), args.limit)
    print(f"{len(inputs)} images from {cxrdata.data_dir(args.data)}")
    reference = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(), args.batch)
    candidate = _candidate(args.candidate, manifest, args)
    try:
        report = compare_backends(reference, candidate, manifest, inputs, records, batch_size=args.batch)
        default_dir = getattr(candidate, "engine_path", manifest.folder / "model.onnx").parent
        report_path = (
            Path(args.report)
            if args.report
            else default_dir / f"parity-{args.candidate.replace(':', '-')}.json"
        )
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(report.to_json() + "\n", encoding="utf-8")
        if args.record:
            record_verdict(candidate, report, report_path)
    finally:
        candidate.close()
        reference.close()
    for head in report.heads:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in head.metrics.items() if v is not None)
        print(
            f"  {head.output} ({head.role}): {shown}"
            + (f"  FAIL: {'; '.join(head.failures)}" if head.failures else "")
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
