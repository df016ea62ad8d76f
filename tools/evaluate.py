"""Evaluate a model through the appliance's own preprocessing and ONNX Runtime backend.

    .venv/bin/python tools/evaluate.py --data ../shared/data/cxr --model engines/cxr-lite0/manifest.yaml \\
        [--precision fp32|int8|fp16] [--split validation|all] [--latency 50] --json OUT

Every image listed in DIR/metadata.csv (known duplicates dropped; with --split validation only the
patients of the model's split.json) is decoded, preprocessed per the manifest and run. The JSON has
exactly the top-level metric keys below, each with a 95 % patient-level bootstrap interval `<key>_ci`
(null where the data has no labels for it), plus `detail` (per-class figures, refusal of generated and
package-shipped non-medical images, optional CPU latency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.errors import UserError
from appliance.interpret.activation import activate
from appliance.manifest import Manifest, Precision, Role, load_manifest
from appliance.preprocess import preprocess
from tools import cxrdata as data
from tools import cxrmetrics as metrics

KEYS = [
    "n_images",
    "view.accuracy",
    "refusal.ct_refused_rate",
    "refusal.cxr_false_refusal_rate",
    "finding.macro_auc",
    "abnormal.auc",
    "severity.extent_r2",
    "severity.extent_mae",
    "severity.opacity_r2",
    "outcome.auc",
]
GENERATED_SEED = 12345  # differs from training's seeds: these pictures were never seen


class Runner:
    """Preprocess + backend + activation, as the appliance does it."""

    def __init__(self, manifest: Manifest, precision: Precision, threads: int = 2) -> None:
        self.manifest = manifest
        config = OnnxRuntimeConfig(intra_op_threads=threads)
        self.backend = OnnxRuntimeBackend(manifest, precision, config, max_batch=8)

    def tensor(self, pixels: np.ndarray) -> np.ndarray:
        return preprocess(pixels, self.manifest.input)[0]

    def run(self, tensors: list[np.ndarray]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(tensors), self.backend.max_batch):
            out = self.backend.run(np.stack(tensors[start : start + self.backend.max_batch]))
            for spec in self.manifest.outputs:
                parts.setdefault(spec.name, []).append(activate(spec, out[spec.name]))
        return {name: np.concatenate(values) for name, values in parts.items()}

    def refused(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Refusal as the manifest declares it: a refused view label, or OOD score above threshold."""
        n = len(next(iter(out.values())))
        reasons = [""] * n
        view = self.manifest.output(Role.view)
        if view is not None:
            for i, k in enumerate(out[view.name].argmax(1)):
                reasons[i] = view.refuse_labels.get(view.labels[k], "")
        ood = self.manifest.output(Role.ood)
        if ood is not None and "ood" in ood.thresholds:
            for i, score in enumerate(out[ood.name][:, 0]):
                if not reasons[i] and score > ood.thresholds["ood"]:
                    reasons[i] = "out of distribution"
        return np.array([bool(r) for r in reasons]), reasons


def with_ci(
    result: dict[str, Any],
    key: str,
    groups: np.ndarray,
    metric: Callable[[np.ndarray], float | None],
    seed: int,
) -> None:
    everyone = np.arange(len(groups))
    result[key] = metric(everyone) if len(groups) else None
    result[f"{key}_ci"] = metrics.bootstrap_ci(groups, metric, seed=seed) if result[key] is not None else None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    folder = data.data_dir(args.data)
    manifest = load_manifest(args.model)
    runner = Runner(manifest, Precision(args.precision), args.threads)
    records = data.load_records(folder)
    if args.split == "validation":
        validation = data.read_split(manifest.folder / "split.json")["validation"]
        records = [r for r in records if r.patient_id in validation]
    notes: list[str] = []
    if args.limit:
        records = records[: args.limit]
    if not data.dicom_supported():
        skipped = [r.file for r in records if r.is_dicom]
        if skipped:
            notes.append(
                f"skipped {len(skipped)} DICOM file(s): appliance.ingest.read_image is not available yet"
            )
        records = [r for r in records if not r.is_dicom]
    if not records:
        raise UserError(f"{folder}: no images to evaluate (split {args.split!r})")
    tensors = [
        runner.tensor(data.read_pixels(folder / r.file)) for r in tqdm(records, desc="decode", mininterval=5)
    ]
    out = runner.run(tensors)
    refused, reasons = runner.refused(out)
    result = score(manifest, records, out, refused, args.seed)
    result["detail"]["refusal_reasons"] = dict(Counter(r or "accepted" for r in reasons))
    result["detail"]["non_medical"] = non_medical(
        runner, args.generated, [folder / r.file for r in records if r.view == data.VIEW_FRONTAL]
    )
    result["detail"].update(
        {
            "precision": args.precision,
            "split": args.split,
            "model": manifest.name,
            "notes": notes,
            "sha256": runner.backend.model_sha256,
        }
    )
    if args.latency:
        result["detail"]["latency_ms_batch1"] = latency(runner, tensors[0], args.latency)
    return result


def score(
    manifest: Manifest, records: list[data.Record], out: dict[str, np.ndarray], refused: np.ndarray, seed: int
) -> dict[str, Any]:
    def column(attr: str) -> np.ndarray:
        return np.array([getattr(r, attr) for r in records])

    groups = column("patient_id")
    view, finding, abnormal, adverse = (
        column("view"),
        column("finding"),
        column("abnormal"),
        column("adverse"),
    )
    extent, opacity = column("extent"), column("opacity")
    cxr = np.array([r.is_cxr for r in records])
    not_lateral = cxr & (view != data.VIEW_LATERAL)
    names = {role: spec.name for role in Role if (spec := manifest.output(role)) is not None}
    view_p, find_p = out[names[Role.view]], out[names[Role.findings]]
    abn_p, sev, risk_p = (
        out[names[Role.abnormal]][:, 0],
        out[names[Role.severity]],
        out[names[Role.risk]][:, 0],
    )
    result: dict[str, Any] = {"n_images": len(records), "n_images_ci": None}

    def subset(
        mask: np.ndarray, fn: Callable[[np.ndarray], float | None]
    ) -> Callable[[np.ndarray], float | None]:
        # Bootstrap draws indices over all images; each metric keeps only the images it has labels for.
        return lambda idx: fn(idx[mask[idx]]) if mask[idx].any() else None

    labelled_view = cxr & (view >= 0)
    with_ci(
        result,
        "view.accuracy",
        groups,
        subset(labelled_view, lambda i: float((view_p[i].argmax(1) == view[i]).mean())),
        seed,
    )
    ct = ~cxr
    with_ci(result, "refusal.ct_refused_rate", groups, subset(ct, lambda i: float(refused[i].mean())), seed)
    frontal = cxr & (view == data.VIEW_FRONTAL)
    with_ci(
        result,
        "refusal.cxr_false_refusal_rate",
        groups,
        subset(frontal, lambda i: float(refused[i].mean())),
        seed,
    )
    has_f = not_lateral & (finding >= 0)
    with_ci(
        result,
        "finding.macro_auc",
        groups,
        subset(has_f, lambda i: metrics.macro_auc(finding[i], find_p[i])),
        seed,
    )
    has_a = not_lateral & (abnormal >= 0)
    with_ci(result, "abnormal.auc", groups, subset(has_a, lambda i: metrics.auc(abnormal[i], abn_p[i])), seed)
    has_s = not_lateral & ~np.isnan(extent)
    with_ci(
        result, "severity.extent_r2", groups, subset(has_s, lambda i: metrics.r2(extent[i], sev[i, 0])), seed
    )
    with_ci(
        result,
        "severity.extent_mae",
        groups,
        subset(has_s, lambda i: metrics.mae(extent[i], sev[i, 0])),
        seed,
    )
    has_o = not_lateral & ~np.isnan(opacity)
    with_ci(
        result,
        "severity.opacity_r2",
        groups,
        subset(has_o, lambda i: metrics.r2(opacity[i], sev[i, 1])),
        seed,
    )
    has_r = not_lateral & (adverse >= 0)
    with_ci(result, "outcome.auc", groups, subset(has_r, lambda i: metrics.auc(adverse[i], risk_p[i])), seed)

    spec = manifest.output(Role.findings)
    labels = spec.labels if spec else []
    per_class = {}
    for k, label in enumerate(labels):
        idx = np.flatnonzero(has_f)
        per_class[label] = {
            "n_positive": int((finding[idx] == k).sum()),
            "auc": metrics.auc(finding[idx] == k, find_p[idx, k]),
        }
    view_labels = manifest.output(Role.view).labels if manifest.output(Role.view) else []  # type: ignore[union-attr]
    confusion = {
        f"{view_labels[t]}->{view_labels[p]}": int(((view == t) & (view_p.argmax(1) == p)).sum())
        for t in range(len(view_labels))
        for p in range(len(view_labels))
    }
    result["detail"] = {
        "finding_per_class": per_class,
        "view_confusion": confusion,
        "counts": {
            "ct": int(ct.sum()),
            "frontal": int(frontal.sum()),
            "lateral": int((view == 1).sum()),
            "finding_labelled": int(has_f.sum()),
            "abnormal_labelled": int(has_a.sum()),
            "severity_labelled": int(has_s.sum()),
            "outcome_labelled": int(has_r.sum()),
            "patients": len(set(groups)),
        },
    }
    return result


def non_medical(runner: Runner, count: int, cxr_files: list[Path]) -> dict[str, Any]:
    """Refusal of pictures that are not chest X-rays: generated ones (inverted evaluated CXRs among them)
    and images shipped in installed packages."""
    generated = data.negative_set(count, GENERATED_SEED, cxr_files)
    kinds = [kind for kind, _ in generated]
    refused, _ = runner.refused(runner.run([t for _, t in generated]))
    per_kind = {
        k: float(np.mean([r for r, kk in zip(refused, kinds, strict=True) if kk == k]))
        for k in sorted(set(kinds))
    }
    files = data.package_images()
    package_refused: float | None = None
    if files:
        tensors = [runner.tensor(data.read_pixels(path)) for path in files]
        package_refused = float(runner.refused(runner.run(tensors))[0].mean())
    return {
        "generated_n": count,
        "generated_refused_rate": float(refused.mean()),
        "generated_per_kind": per_kind,
        "package_images_n": len(files),
        "package_images_refused_rate": package_refused,
    }


def latency(runner: Runner, sample: np.ndarray, runs: int) -> dict[str, float]:
    batch = sample[None]
    for _ in range(5):
        runner.backend.run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.backend.run(batch)
        times.append((time.perf_counter() - start) * 1000)
    return {
        "median": round(statistics.median(times), 2),
        "p90": round(float(np.percentile(times, 90)), 2),
        "runs": runs,
        "threads": runner.backend.session.get_session_options().intra_op_num_threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder with metadata.csv (default $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--model", type=Path, default=data.REPO / "engines" / "cxr-lite0" / "manifest.yaml")
    parser.add_argument("--precision", default="fp32", choices=[p.value for p in Precision])
    parser.add_argument("--split", default="validation", choices=["validation", "all"])
    parser.add_argument("--json", type=Path, required=True, help="where to write the metrics")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="first N images only (CI)")
    parser.add_argument(
        "--generated", type=int, default=60, help="generated non-medical images to test refusal"
    )
    parser.add_argument("--latency", type=int, default=0, help="also time N batch-1 runs")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for key in KEYS:
        value, ci = result[key], result.get(f"{key}_ci")
        shown = "null" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:34s} {shown}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    nm = result["detail"]["non_medical"]
    print(f"{'non-medical generated refused':34s} {nm['generated_refused_rate']:.3f} (n={nm['generated_n']})")
    if nm["package_images_refused_rate"] is not None:
        print(
            f"{'package images refused':34s} {nm['package_images_refused_rate']:.3f} (n={nm['package_images_n']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
