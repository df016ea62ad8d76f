"""The extra runs of tools/training/evaluate.py through the Analyzer: the mirror test, refusal of generated
and package-shipped non-medical pictures, and batch-1 latency."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.errors import InputRejected
from appliance.ingest import read_image
from appliance.interpret.zones import dominant_side
from appliance.pipeline import Analyzer
from appliance.result import Result
from tools.training import dataset as data
from tools.training.evaluate_images import analyze

GENERATED_SEED = 12345  # differs from training's seeds: these pictures were never seen


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
