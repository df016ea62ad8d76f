"""Evaluate what the appliance publishes: the Analyzer's own Result objects, scored against the labels.

    .venv/bin/cxr-evaluate --json OUT [--data DIR] [--model engines/cxr-lite0] [--precision fp32]

Which images: when DIR is the data the model was trained on (same metadata.csv hash as the manifest's
training record) only the model's validation patients (split.json) are scored; any other folder with a
metadata.csv is evaluated whole, without flags. Every file goes through `Analyzer.analyze`, exactly as
`cxr-appliance process` and the daemon run it (reader, tag gate, preprocessing, backend, the decision
table), and only what a Result carries is scored: an unpublished output has no figure here.

Reported, each with a 95 % patient-level bootstrap interval: refusal (laterals, CT, generated and
package-shipped non-medical pictures, false refusal of frontal CXRs), abnormal AUC pooled and within
source (NIH normal vs pneumonia, JSRT normal vs nodule, ... where no source shortcut helps), triage
sensitivity/specificity at the shipped operating point, every published finding, severity R², outcome
AUC, the cardiothoracic ratio against the reference masks, the mirror test (does the dominant side of
the lung zones follow a mirrored image?) and the text audit (decisions.audit on every result).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from appliance.assemble import build_analyzer, job_for_file
from appliance.config import AppConfig
from appliance.errors import InputRejected, UserError
from appliance.ingest import read_image
from appliance.interpret.cardiac import cardiothoracic_ratio
from appliance.interpret.decisions import audit_result
from appliance.interpret.zones import dominant_side
from appliance.manifest import Precision, Role, load_manifest
from appliance.pipeline import Analyzer
from appliance.result import Result
from tools.training import dataset as data
from tools.training import metrics

KEYS = [
    "n_images",
    "view.accuracy",
    "refusal.lateral_refused_rate",
    "refusal.ct_refused_rate",
    "refusal.cxr_false_refusal_rate",
    "refusal.labelled_frontal_false_refusal_rate",
    "finding.macro_auc",
    "finding.macro_auc_within_source",
    "abnormal.auc",
    "abnormal.auc_within_source",
    "triage.sensitivity",
    "triage.specificity",
    "severity.extent_r2",
    "severity.extent_mae",
    "severity.opacity_r2",
    "outcome.auc",
    "outcome.auc_within_source",
    "cardiac.ctr_mae",
    "mirror.dominant_side_consistency",
    "zones.left_share",
    "text.contradictions",
]
GENERATED_SEED = 12345  # differs from training's seeds: these pictures were never seen
WITHIN_SOURCE_PAIRS: dict[str, tuple[str, str | None]] = {
    "nih normal vs pneumonia": ("nih", "Pneumonia"),
    "jsrt normal vs nodule": ("jsrt", "Nodule"),
    "c19r normal vs covid-19": ("c19r", "COVID-19"),
    "cohen normal vs abnormal": ("cohen", None),
}


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


def with_ci(
    out: dict[str, Any], key: str, groups: np.ndarray, metric: Callable[[np.ndarray], float | None], seed: int
) -> None:
    everyone = np.arange(len(groups))
    value = metric(everyone) if len(groups) else None
    out[key] = None if value is None else round(float(value), 4)
    ci = metrics.bootstrap_ci(groups, metric, seed=seed) if value is not None else None
    out[f"{key}_ci"] = [round(v, 4) for v in ci] if ci else None


def finding_score(result: Result, label: str) -> float | None:
    return next((f.score for f in result.findings if f.label == label), None)


Metric = Callable[[np.ndarray], float | None]


def auc_of(truth: np.ndarray, scores: np.ndarray) -> Metric:
    return lambda i: metrics.auc(truth[i], scores[i])


def within_auc_of(truth: np.ndarray, scores: np.ndarray, sources: np.ndarray) -> Metric:
    return lambda i: metrics.within_source_auc(truth[i], scores[i], sources[i])


def r2_of(truth: np.ndarray, pred: np.ndarray) -> Metric:
    return lambda i: metrics.r2(truth[i], pred[i])


def mae_of(truth: np.ndarray, pred: np.ndarray) -> Metric:
    return lambda i: metrics.mae(truth[i], pred[i])


def score(
    records: list[data.Record],
    results: list[Result],
    raw: dict[str, dict[str, str]],
    folder: Path,
    published: list[str],
    seed: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"n_images": len(records), "n_images_ci": None}
    groups = np.array([r.patient_id for r in records])
    sources = np.array([r.source for r in records])
    ok = np.array([res.status == "ok" for res in results])
    refused = np.array([res.status == "refused" for res in results])
    cxr = np.array([r.is_cxr for r in records])
    view = np.array([r.view for r in records])
    lateral = cxr & (view == data.VIEW_LATERAL)
    known_frontal = cxr & (view == data.VIEW_FRONTAL)
    # A blank view (all of c19r) is a frontal X-ray by the data README's visual check: scored with them.
    frontal = cxr & (view != data.VIEW_LATERAL)

    def rate(mask: np.ndarray, flags: np.ndarray) -> Callable[[np.ndarray], float | None]:
        return lambda idx: float(flags[idx[mask[idx]]].mean()) if mask[idx].any() else None

    predicted_view = np.array(
        [0 if res.status == "ok" else 1 if res.reason == "lateral view" else 2 for res in results]
    )
    known_view = view >= 0
    with_ci(
        out,
        "view.accuracy",
        groups,
        lambda i: (
            float((predicted_view[i[known_view[i]]] == view[i[known_view[i]]]).mean())
            if known_view[i].any()
            else None
        ),
        seed,
    )
    with_ci(out, "refusal.lateral_refused_rate", groups, rate(lateral, refused), seed)
    with_ci(out, "refusal.ct_refused_rate", groups, rate(~cxr, refused | ~ok), seed)
    with_ci(out, "refusal.cxr_false_refusal_rate", groups, rate(frontal, ~ok), seed)
    with_ci(out, "refusal.labelled_frontal_false_refusal_rate", groups, rate(known_frontal, ~ok), seed)

    # --- abnormal and triage, on accepted frontal images with a label
    abnormal = np.array([r.abnormal for r in records])
    a_score = np.array([res.abnormal.score if res.abnormal else np.nan for res in results])
    has_a = frontal & ok & (abnormal >= 0) & ~np.isnan(a_score)

    def on(
        mask: np.ndarray, fn: Callable[[np.ndarray], float | None]
    ) -> Callable[[np.ndarray], float | None]:
        return lambda idx: fn(idx[mask[idx]]) if mask[idx].any() else None

    with_ci(out, "abnormal.auc", groups, on(has_a, lambda i: metrics.auc(abnormal[i], a_score[i])), seed)
    with_ci(
        out,
        "abnormal.auc_within_source",
        groups,
        on(has_a, lambda i: metrics.within_source_auc(abnormal[i], a_score[i], sources[i])),
        seed,
    )
    flagged = np.array([res.triage in ("abnormal", "urgent") for res in results])
    with_ci(
        out,
        "triage.sensitivity",
        groups,
        on(has_a & (abnormal == 1), lambda i: float(flagged[i].mean())),
        seed,
    )
    with_ci(
        out,
        "triage.specificity",
        groups,
        on(has_a & (abnormal == 0), lambda i: float((~flagged[i]).mean())),
        seed,
    )

    # --- findings (only those the model publishes)
    per_finding: dict[str, Any] = {}
    pooled, within = [], []
    for label in published:
        k = data.FINDING_LABELS.index(label) if label in data.FINDING_LABELS else None
        truth = np.array([r.labels[k] if k is not None and r.labels else -1 for r in records])
        s = np.array(
            [finding_score(res, label) if res.status == "ok" else None for res in results], dtype=float
        )
        mask = frontal & ok & (truth >= 0) & ~np.isnan(s)
        entry: dict[str, Any] = {
            "n_positive": int((truth[mask] == 1).sum()),
            "n_negative": int((truth[mask] == 0).sum()),
        }
        with_ci(entry, "auc", groups, on(mask, auc_of(truth, s)), seed)
        with_ci(
            entry,
            "auc_within_source",
            groups,
            on(mask, within_auc_of(truth, s, sources)),
            seed,
        )
        per_finding[label] = entry
        if entry["auc"] is not None:
            pooled.append(entry["auc"])
        if entry["auc_within_source"] is not None:
            within.append(entry["auc_within_source"])
    out["finding.macro_auc"] = round(float(np.mean(pooled)), 4) if pooled else None
    out["finding.macro_auc_ci"] = None
    out["finding.macro_auc_within_source"] = round(float(np.mean(within)), 4) if within else None
    out["finding.macro_auc_within_source_ci"] = None

    # --- within-source pairs that no source shortcut can inflate
    pairs: dict[str, Any] = {}
    for name, (pair_source, pair_label) in WITHIN_SOURCE_PAIRS.items():
        inside = has_a & (sources == pair_source)
        if pair_label is not None:
            k = data.FINDING_LABELS.index(pair_label)
            truth = np.array(
                [1 if r.labels and r.labels[k] == 1 else 0 if r.finding == 0 else -1 for r in records]
            )
            inside &= truth >= 0
        else:
            truth = abnormal
        entry = {"n": int(inside.sum())}
        with_ci(entry, "abnormal_auc", groups, on(inside, auc_of(truth, a_score)), seed)
        if pair_label is not None and pair_label in published:
            s = np.array([finding_score(res, pair_label) for res in results], dtype=float)
            with_ci(
                entry,
                f"{pair_label}_auc",
                groups,
                on(inside & ~np.isnan(s), auc_of(truth, s)),
                seed,
            )
        pairs[name] = entry

    # --- severity and outcome, as published
    for name, attr, top in (("extent", "extent", 8.0), ("opacity", "opacity", 6.0)):
        truth = np.array([getattr(r, attr) for r in records])
        pred = np.array(
            [
                getattr(res.severity, attr)
                if res.severity and getattr(res.severity, attr) is not None
                else np.nan
                for res in results
            ]
        )
        mask = ~np.isnan(truth) & ~np.isnan(pred)
        with_ci(
            out,
            f"severity.{name}_r2",
            groups,
            on(mask, r2_of(truth, pred)),
            seed,
        )
        if name == "extent":
            with_ci(
                out,
                "severity.extent_mae",
                groups,
                on(mask, mae_of(truth, pred)),
                seed,
            )
        out.setdefault("detail_severity", {})[name] = {
            "scored": int((~np.isnan(truth)).sum()),
            "published_for": int(mask.sum()),
            "max": top,
        }
    adverse = np.array([r.adverse for r in records])
    risk = np.array([res.risk.score if res.risk else np.nan for res in results])
    has_r = (adverse >= 0) & ~np.isnan(risk)
    with_ci(out, "outcome.auc", groups, on(has_r, auc_of(adverse, risk)), seed)
    # Hannover patients are nearly all ICU cases: within source, recognising Hannover does not help.
    with_ci(out, "outcome.auc_within_source", groups, on(has_r, within_auc_of(adverse, risk, sources)), seed)

    # --- cardiothoracic ratio against the reference masks; NIH cardiomegaly label
    cardiac: dict[str, Any] = {}
    ctr_pairs = []
    for r, res in zip(records, results, strict=True):
        if r.heart_mask_file and r.mask_file and res.cardiac is not None:
            reference = reference_ctr(r, folder)
            if reference is not None:
                ctr_pairs.append((reference, res.cardiac.ratio, r.patient_id))
    if ctr_pairs:
        ref = np.array([p[0] for p in ctr_pairs])
        got = np.array([p[1] for p in ctr_pairs])
        g = np.array([p[2] for p in ctr_pairs])
        with_ci(out, "cardiac.ctr_mae", g, lambda i: metrics.mae(ref[i], got[i]), seed)
        cardiac.update(
            n=len(ctr_pairs),
            pearson=round(float(np.corrcoef(ref, got)[0, 1]), 4) if len(ref) > 2 else None,
            enlarged_agreement=round(float(((ref >= 0.5) == (got >= 0.5)).mean()), 4),
            reference_enlarged=int((ref >= 0.5).sum()),
        )
    else:
        out["cardiac.ctr_mae"], out["cardiac.ctr_mae_ci"] = None, None
    nih_cm = [
        (("Cardiomegaly" in raw.get(r.file, {}).get("finding_raw", "")), res.cardiac.ratio)
        for r, res in zip(records, results, strict=True)
        if r.source == "nih" and res.cardiac is not None
    ]
    if nih_cm:
        truth_cm = np.array([t for t, _ in nih_cm])
        cardiac["nih_cardiomegaly_label"] = {
            "n_positive": int(truth_cm.sum()),
            "n": len(nih_cm),
            "auc_of_ratio": metrics.auc(truth_cm, np.array([v for _, v in nih_cm])),
        }
    cardiac["measured"] = int(sum(res.cardiac is not None for res in results))
    out["detail_cardiac"] = cardiac

    # --- zones: left/right share over everything published
    right = sum(z.involvement for res in results for z in res.zones if z.side == "right")
    left = sum(z.involvement for res in results for z in res.zones if z.side == "left")
    out["zones.left_share"] = round(left / (left + right), 4) if left + right > 0 else None
    out["zones.left_share_ci"] = None

    # --- text audit
    problems = []
    for r, res in zip(records, results, strict=True):
        found = audit_result(res)
        problems += [f"{r.file}: {p}" for p in found]
    out["text.contradictions"] = len(problems)
    out["text.contradictions_ci"] = None
    out["detail"] = {
        "findings": per_finding,
        "within_source_pairs": pairs,
        "text_problems": problems[:20],
        "status": dict(Counter(res.status for res in results)),
        "triage": dict(Counter(res.triage or "-" for res in results)),
        "refusal_reasons": dict(Counter(res.reason for res in results if res.status != "ok")),
        "counts": {
            "frontal_or_blank_view": int(frontal.sum()),
            "lateral": int(lateral.sum()),
            "ct": int((~cxr).sum()),
            "patients": len(set(groups)),
        },
    }
    out["detail"]["severity"] = out.pop("detail_severity")
    out["detail"]["cardiac"] = out.pop("detail_cardiac")
    return out


def reference_ctr(record: data.Record, folder: Path) -> float | None:
    with Image.open(folder / record.mask_file) as lung, Image.open(folder / record.heart_mask_file) as heart:
        lungs = np.asarray(lung.convert("L"), dtype=np.float32) / 255
        hearts = np.asarray(heart.convert("L"), dtype=np.float32) / 255
    measured = cardiothoracic_ratio(lungs, hearts)
    return None if measured is None else measured.ratio


def mirror_test(
    analyzer: Analyzer,
    records: list[data.Record],
    results: list[Result],
    folder: Path,
    limit: int,
    work: Path,
) -> dict[str, Any]:
    """Mirror every image whose published zones have a dominant side; the mirrored reading's dominant
    side must be the other one. A mirrored image read as normal (no zones) counts as a failure."""
    chosen = [
        (r, res)
        for r, res in zip(records, results, strict=True)
        if res.status == "ok" and dominant_side(res.zones)
    ][:limit]
    paths = []
    for index, (r, _) in enumerate(chosen):
        try:
            pixels = read_image(folder / r.file, target_size=1024).pixels
        except InputRejected:
            continue
        path = work / f"mirror-{index:05d}.png"
        Image.fromarray((np.clip(pixels[:, ::-1], 0, 1) * 65535).astype(np.uint16)).save(path)
        paths.append((path, index))
    mirrored = analyze(analyzer, [p for p, _ in paths], "mirror") if paths else []
    agree = 0
    for (_, index), res in zip(paths, mirrored, strict=True):
        side = dominant_side(chosen[index][1].zones)
        agree += dominant_side(res.zones) == {"right": "left", "left": "right"}[side or "right"]
    n = len(mirrored)
    return {"n": n, "consistency": round(agree / n, 4) if n else None}


def non_medical(analyzer: Analyzer, count: int, cxr_files: list[Path], work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(GENERATED_SEED)
    paths, kinds = [], []
    for index in range(count):
        kind = data.NEGATIVE_KINDS[index % len(data.NEGATIVE_KINDS)]
        source = (
            data.read_pixels(cxr_files[int(rng.integers(0, len(cxr_files)))])
            if kind == "inverted" and cxr_files
            else None
        )
        if kind == "inverted" and source is None:
            kind = "noise"
        picture = data.negative_image(kind, rng, source)
        path = work / f"generated-{index:04d}.png"
        Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
        kinds.append(kind)
    results = analyze(analyzer, paths, "non-medical") if paths else []
    refused = np.array([res.status != "ok" for res in results])
    files = data.package_images()
    package = analyze(analyzer, files, "package images") if files else []
    return {
        "generated_n": count,
        "generated_refused_rate": round(float(refused.mean()), 4) if count else None,
        "generated_per_kind": {
            k: round(float(np.mean([f for f, kk in zip(refused, kinds, strict=True) if kk == k])), 4)
            for k in sorted(set(kinds))
        },
        "package_images_n": len(files),
        "package_images_refused_rate": round(float(np.mean([res.status != "ok" for res in package])), 4)
        if package
        else None,
    }


def latency(analyzer: Analyzer, results: list[Result], runs: int) -> dict[str, Any]:
    spec = analyzer.manifest.input
    batch = np.zeros((1, spec.channels, spec.height, spec.width), np.float32)
    for _ in range(5):
        analyzer.backend.run(batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        analyzer.backend.run(batch)
        times.append((time.perf_counter() - start) * 1000)
    interpret = [res.timings_ms["interpret"] for res in results if "interpret" in res.timings_ms]
    return {
        "infer_batch1_median_ms": round(statistics.median(times), 2),
        "infer_batch1_p90_ms": round(float(np.percentile(times, 90)), 2),
        "interpret_median_ms": round(statistics.median(interpret), 2) if interpret else None,
        "runs": runs,
    }


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    folder = data.data_dir(args.data)
    manifest = load_manifest(args.model)
    records, split = choose_records(folder, manifest.folder, dict(manifest.training), args.split)
    if args.limit:
        records = records[: args.limit]
    if not records:
        raise UserError(f"{folder}: no images to evaluate (split {split!r})")
    with (folder / "metadata.csv").open(newline="") as handle:
        raw: dict[str, dict[str, str]] = {row["file"]: row for row in csv.DictReader(handle)}
    analyzer = make_analyzer(args.model, args.precision, args.threads)
    results = analyze(analyzer, [folder / r.file for r in records], "evaluate")
    findings_spec = manifest.output(Role.findings)
    published = [
        label
        for label in (findings_spec.labels if findings_spec else [])
        if findings_spec and findings_spec.is_published(label) and label != findings_spec.normal_label
    ]
    result = score(records, results, raw, folder, published, args.seed)
    with tempfile.TemporaryDirectory(prefix="cxr-eval-") as tmp:
        work = Path(tmp)
        mirror = mirror_test(analyzer, records, results, folder, args.mirror, work)
        result["mirror.dominant_side_consistency"] = mirror["consistency"]
        result["mirror.dominant_side_consistency_ci"] = None
        result["detail"]["mirror"] = mirror
        frontal_files = [folder / r.file for r in records if r.view == data.VIEW_FRONTAL and not r.is_dicom]
        result["detail"]["non_medical"] = non_medical(analyzer, args.generated, frontal_files, work)
    result["detail"].update(
        {
            "precision": args.precision,
            "split": split,
            "model": f"{manifest.name} {manifest.version}",
            "sha256": analyzer.backend.model_sha256,
            "published_findings": published,
        }
    )
    if args.latency:
        result["detail"]["latency"] = latency(analyzer, results, args.latency)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="folder with metadata.csv (default $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--model", type=Path, default=data.REPO / "engines" / "cxr-lite0" / "manifest.yaml")
    parser.add_argument("--precision", default="fp32", choices=[p.value for p in Precision])
    parser.add_argument(
        "--split",
        default="auto",
        choices=["auto", "validation", "all"],
        help="auto: the validation patients on the training data, every image elsewhere",
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the metrics")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, help="first N images only (CI)")
    parser.add_argument(
        "--generated", type=int, default=60, help="generated non-medical images to test refusal"
    )
    parser.add_argument("--mirror", type=int, default=400, help="images in the mirror test (at most)")
    parser.add_argument("--latency", type=int, default=0, help="also time N batch-1 inferences")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    for key in KEYS:
        value, ci = result.get(key), result.get(f"{key}_ci")
        shown = "null" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key:36s} {shown}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    for name, entry in result["detail"]["within_source_pairs"].items():
        print(f"  {name:34s} {json.dumps(entry)}")
    for label, entry in result["detail"]["findings"].items():
        print(f"  finding {label:26s} {json.dumps(entry)}")
    nm = result["detail"]["non_medical"]
    print(f"{'non-medical generated refused':36s} {nm['generated_refused_rate']} (n={nm['generated_n']})")
    print(f"{'package images refused':36s} {nm['package_images_refused_rate']} (n={nm['package_images_n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
