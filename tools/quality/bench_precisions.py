"""Inference alone (tools/quality/bench.py): each precision the model ships (and FP16/INT8 files beside it
that failed their gate, marked unshipped) on ONNX Runtime CPU, its speed and score delta against FP32 on
real images, and the thread / graph-optimisation sweep. Every timing runs in a fresh process
(`python -m tools.quality.bench --probe ...`)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.manifest import Manifest, Precision, load_manifest
from appliance.pipeline import Job
from tools.quality.bench_stages import make_analyzer
from tools.quality.bench_timing import summary, timed
from tools.training.dataset import REPO


def measure_precisions(
    manifest_path: Path, ort_config: OnnxRuntimeConfig, work: Path, images: list[Path], repeats: int
) -> dict[str, Any]:
    manifest = load_manifest(manifest_path)
    out: dict[str, Any] = {}
    manifest_path, unshipped = with_unshipped_precisions(manifest, work)
    manifest = load_manifest(manifest_path)
    shipped = [p for p in Precision if p in manifest.onnx]
    reference: list[dict[str, float]] | None = None
    reference_triage: list[str | None] = []
    for precision in shipped:
        timing = infer_timing_isolated(manifest_path, precision, ort_config, repeats)
        analyzer = make_analyzer(manifest_path, precision, ort_config, work)
        entry: dict[str, Any] = {f"infer_ms_per_image_{k}": v for k, v in timing.items()}
        results = analyzer.analyze(
            [Job(path=p, image_id=f"acc{i}", source="bench") for i, p in enumerate(images)]
        )
        scores = [{f.label: f.score for f in r.findings} for r in results]
        if reference is None:
            reference, reference_triage = scores, [r.triage for r in results]
        else:
            deltas = [
                abs(s[k] - ref[k]) for s, ref in zip(scores, reference, strict=True) for k in ref if k in s
            ]
            agree = [r.triage == t for r, t in zip(results, reference_triage, strict=True)]
            entry["vs_fp32"] = {
                "images": len(images),
                "score_abs_delta_mean": round(float(np.mean(deltas)), 5) if deltas else None,
                "score_abs_delta_max": round(float(np.max(deltas)), 5) if deltas else None,
                "triage_agreement": round(float(np.mean(agree)), 4) if agree else None,
            }
        analyzer.backend.close()
        if precision in unshipped:
            entry["shipped"] = False
            entry["note"] = unshipped[precision]
        out[precision.value] = entry
    if Precision.int8 in shipped and ort_config.int8_cpu_lowering:
        # The backend runs INT8 lowered for the CPU (appliance.backends.ort_lowering); the file as
        # TensorRT reads it, unlowered, is timed for comparison.
        unlowered = ort_config.model_copy(update={"int8_cpu_lowering": False})
        timing = infer_timing_isolated(manifest_path, Precision.int8, unlowered, repeats)
        out["int8 (TensorRT form, not lowered)"] = {f"infer_ms_per_image_{k}": v for k, v in timing.items()}
    for batch in (1, 4):
        fp32 = out.get("fp32", {}).get(f"infer_ms_per_image_batch{batch}", {}).get("median")
        for entry in out.values():
            mine = entry[f"infer_ms_per_image_batch{batch}"].get("median")
            if fp32 and mine:
                entry[f"speedup_vs_fp32_batch{batch}"] = round(fp32 / mine, 3)
    missing = [p.value for p in (Precision.fp16, Precision.int8) if p not in shipped]
    if missing:
        out["not_shipped"] = missing
    try:
        import tensorrt  # noqa: F401

        out["tensorrt"] = "importable; run tools/engines/build_engine.py on a GPU cart and bench there"
    except ImportError:
        out["tensorrt"] = "skipped: tensorrt is not installed (CPU-only machine)"
    return out


def with_unshipped_precisions(manifest: Manifest, work: Path) -> tuple[Path, dict[Precision, str]]:
    """A manifest copy (in `work`) that also lists model.fp16.onnx / model.int8.onnx when they sit next to
    the model but the manifest leaves them out (their parity gate failed): measured, marked unshipped."""
    import yaml

    from appliance.manifest import sha256_file

    source = manifest.folder / "manifest.yaml"
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    unshipped: dict[Precision, str] = {}
    for precision, name in ((Precision.fp16, "model.fp16.onnx"), (Precision.int8, "model.int8.onnx")):
        path = manifest.folder / name
        if precision not in manifest.onnx and path.is_file():
            doc["onnx"][precision.value] = {"file": str(path.resolve()), "sha256": sha256_file(path)}
            report = manifest.folder / f"parity_{precision.value}.md"
            unshipped[precision] = "not in the manifest" + (
                f" (parity gate: {report.read_text(encoding='utf-8').splitlines()[0].lstrip('# ')})"
                if report.is_file()
                else ""
            )
    if not unshipped:
        return source, unshipped
    folder = work / "precisions"
    folder.mkdir(exist_ok=True)
    for precision, entry in manifest.onnx.items():
        doc["onnx"][precision.value]["file"] = str((manifest.folder / entry.file).resolve())
    copy = folder / "manifest.yaml"
    copy.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return copy, unshipped


def infer_timing(
    manifest_path: Path, precision: Precision, config: OnnxRuntimeConfig, repeats: int
) -> dict[str, Any]:
    """ms per image at batch 1 and 4 (zeros: the time does not depend on the pixels)."""
    manifest = load_manifest(manifest_path)
    spec = manifest.input
    shape = (
        (spec.height, spec.width, spec.channels)
        if spec.layout == "NHWC"
        else (spec.channels, spec.height, spec.width)
    )
    backend = OnnxRuntimeBackend(manifest, precision, config)
    out: dict[str, Any] = {}
    for batch in (1, 4):
        tensor = np.zeros((batch, *shape), dtype=backend.input_dtype)
        backend.run(tensor)
        out[f"batch{batch}"] = summary(
            [timed(partial(backend.run, tensor))[1] / batch for _ in range(repeats * 4)]
        )
    backend.close()
    return out


def infer_timing_isolated(
    manifest_path: Path, precision: Precision, config: OnnxRuntimeConfig, repeats: int
) -> dict[str, Any]:
    """infer_timing in a fresh process: the spinning worker threads of other ONNX Runtime sessions in
    this one would compete for the cores and make 2-thread figures look 4x worse than they are."""
    probe = json.dumps(
        {
            "model": str(manifest_path),
            "precision": precision.value,
            "ort": config.model_dump(),
            "repeats": repeats,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tools.quality.bench", "--probe", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def measure_ort_sweep(manifest_path: Path, repeats: int) -> dict[str, Any]:
    """Thread counts and graph optimisation levels, FP32: the evidence for the defaults."""
    out: dict[str, Any] = {}
    for threads in (1, 2):
        for level in ("extended", "all"):
            config = OnnxRuntimeConfig(intra_op_threads=threads, graph_optimization=level)
            timing = infer_timing_isolated(manifest_path, Precision.fp32, config, repeats)
            out[f"intra{threads}_{level}"] = {f"{k}_ms_per_image": v.get("median") for k, v in timing.items()}
    return out
