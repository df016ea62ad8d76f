"""CPU inference time of one or more models, measured in one run, interleaved (so a busy machine
slows all of them alike). Compare models only within one run: machines differ between sessions.

    .venv/bin/python tools/latency.py engines/cxr-lite0 /tmp/old-model-folder --runs 200 [--batch 1 4]

Each model is run through the appliance's ONNX Runtime backend on real preprocessed chest X-rays
(the manifest's input spec); reports the median and p90 milliseconds per image for each batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.errors import UserError
from appliance.manifest import Precision, load_manifest
from appliance.preprocess import preprocess
from tools import cxrdata as data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path, help="model folders or manifest.yaml files")
    parser.add_argument("--precision", default="fp32", choices=[p.value for p in Precision])
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
        for path in args.models:
            manifest = load_manifest(path)
            tensors = np.stack([preprocess(p, manifest.input)[0] for p in pixels])
            config = OnnxRuntimeConfig(intra_op_threads=args.threads)
            backend = OnnxRuntimeBackend(
                manifest, Precision(args.precision), config, max_batch=max(args.batch)
            )
            backends.append((str(path), backend, tensors))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    times: dict[tuple[str, int], list[float]] = {(name, b): [] for name, _, _ in backends for b in args.batch}
    for _, backend, tensors in backends:
        for b in args.batch:
            for _ in range(5):
                backend.run(tensors[:b])
    for run in tqdm(range(args.runs), desc="latency", mininterval=5):
        for name, backend, tensors in backends:
            for b in args.batch:
                start = time.perf_counter()
                backend.run(tensors[(run % 2) * 4 : (run % 2) * 4 + b] if b <= 4 else tensors[:b])
                times[(name, b)].append((time.perf_counter() - start) * 1000 / b)
    report = {
        f"{name} batch {b}": {
            "median_ms_per_image": round(statistics.median(v), 2),
            "p90_ms_per_image": round(float(np.percentile(v, 90)), 2),
        }
        for (name, b), v in times.items()
    }
    for key, value in report.items():
        print(
            f"{key:60s} median {value['median_ms_per_image']:7.2f} ms/image  p90 {value['p90_ms_per_image']:7.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"runs": args.runs, "threads": args.threads, **report}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
