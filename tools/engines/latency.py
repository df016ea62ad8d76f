"""CPU inference time of one or more models, measured in one run, interleaved (so a busy machine
slows all of them alike). Compare models only within one run: machines differ between sessions.

    .venv/bin/cxr-latency engines/cxr-lite0 /tmp/old-model-folder --runs 200 [--batch 1 4]
    .venv/bin/cxr-latency engines/cxr-lite0 --precision fp32 fp16 int8 --int8-tensorrt-form

Each model is run through the appliance's ONNX Runtime backend on real preprocessed chest X-rays
(the manifest's input spec); reports the median and p90 milliseconds per image for each batch size,
and each row's speed-up over the same model's fp32 row when fp32 is measured too. INT8 runs as the backend
runs it: lowered in memory for the CPU (appliance.backends.ort_lowering); `--int8-tensorrt-form` adds the
file as TensorRT reads it, unlowered, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.errors import UserError
from appliance.manifest import Precision, load_manifest
from appliance.preprocess import preprocess
from tools.training import dataset as data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path, help="model folders or manifest.yaml files")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=[p.value for p in Precision], help="one or more"
    )
    parser.add_argument(
        "--int8-tensorrt-form",
        action="store_true",
        help="also time the INT8 file without the CPU lowering (what TensorRT reads)",
    )
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", help="CXR data folder (default $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        folder = data.data_dir(args.data)
        frontal = [r for r in data.load_records(folder) if r.view == data.VIEW_FRONTAL and not r.is_dicom][:8]
        pixels = [data.read_pixels(folder / r.file) for r in frontal]
        backends = []
        variants = [(p, True) for p in args.precision]
        if args.int8_tensorrt_form and "int8" in args.precision:
            variants.append(("int8", False))
        for path in args.models:
            manifest = load_manifest(path)
            tensors = np.stack([preprocess(p, manifest.input)[0] for p in pixels])
            for precision, lower in variants:
                config = OnnxRuntimeConfig(intra_op_threads=args.threads, int8_cpu_lowering=lower)
                backend = OnnxRuntimeBackend(
                    manifest, Precision(precision), config, max_batch=max(args.batch)
                )
                label = precision if lower or precision != "int8" else "int8 (TensorRT form)"
                backends.append((str(path), label, backend, tensors))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    times: dict[tuple[str, str, int], list[float]] = {
        (name, label, b): [] for name, label, _, _ in backends for b in args.batch
    }
    for _, _, backend, tensors in backends:
        for b in args.batch:
            for _ in range(5):
                backend.run(tensors[:b])
    for run in tqdm(range(args.runs), desc="latency", mininterval=5):
        for name, label, backend, tensors in backends:
            for b in args.batch:
                start = time.perf_counter()
                backend.run(tensors[(run % 2) * 4 : (run % 2) * 4 + b] if b <= 4 else tensors[:b])
                times[(name, label, b)].append((time.perf_counter() - start) * 1000 / b)
    report: dict[str, dict[str, float]] = {}
    for (name, label, b), v in times.items():
        entry = {
            "median_ms_per_image": round(statistics.median(v), 2),
            "p90_ms_per_image": round(float(np.percentile(v, 90)), 2),
        }
        fp32 = times.get((name, "fp32", b))
        if fp32:
            entry["speedup_vs_fp32"] = round(statistics.median(fp32) / statistics.median(v), 2)
        key = (
            f"{name} batch {b}"
            if len(args.precision) == 1 and len(backends) == len(args.models)
            else f"{name} {label} batch {b}"
        )
        report[key] = entry
    for key, value in report.items():
        speedup = f"  {value['speedup_vs_fp32']:.2f}x fp32" if "speedup_vs_fp32" in value else ""
        print(
            f"{key:60s} median {value['median_ms_per_image']:7.2f} ms/image"
            f"  p90 {value['p90_ms_per_image']:7.2f}{speedup}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"runs": args.runs, "threads": args.threads, **report}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
