"""INT8 (explicit Q/DQ for TensorRT 10) and FP16 ONNX from the fp32 model, each judged by the parity gate.

    .venv/bin/cxr-quantize --model engines/cxr-lite0 [--data DIR] [--limit N]

The gate is tools/engines/parity_gate.py (rule and justification: docs/parity.md), the same code as
tools/engines/check_parity.py. It runs fp32 and each candidate on the validation patients (split.json) and
judges every published score; a candidate that fails is removed from the manifest, one that passes is
listed with its sha256 and `gate:` pointing at its report. Exit 0: all passed, 1: one failed, 2: usage.

INT8 is what TensorRT 10 explicit quantisation accepts: signed INT8, zero point 0, per-channel weights
(axis 0), per-tensor activations, float biases (TensorRT refuses an INT32 DequantizeLinear). It is
calibrated on TRAINING patients through the appliance's own reading and preprocessing. Which leading
backbone blocks stay float is chosen on other training images (`--float-blocks auto`): the fewest for
which the candidate passes the gate's label-free checks there (no flip outside the band, deviation within
0.8 of its limit); the validation set is only used for the verdict. The heads, the in-graph CAM, the OOD
distance and the mask decoder stay float; the pre-ReLU6 Q takes the post-ReLU6 scale.

The appliance's ONNX Runtime backend runs the INT8 file lowered in memory for the CPU (UINT8 activations,
appliance.backends.ort_lowering; the file stays what TensorRT reads). INT8 passes only when both forms
pass the gate: the file as it is and the lowered form (also in the float-block selection). Each report
also has the CPU latency of fp32 / int8 (lowered: int8_cpu, and as it is) / fp16 at batch 1 and 4 (ONNX
Runtime, one process, interleaved).

Beside this file: quantize_int8.py (calibration, float-block selection; its Q/DQ surgery in
qdq_graph.py), quantize_fp16.py, onnx_runs.py (images and ONNX Runtime runs, timing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from appliance.errors import UserError
from appliance.manifest import Manifest, Precision, load_manifest, sha256_file
from tools.engines.onnx_runs import read_tensors, run, split_records, split_tensors, timings
from tools.engines.parity_accuracy import Truth
from tools.engines.parity_gate import judge
from tools.engines.parity_noise import NOISE_FILE, fp32_reference_and_noise
from tools.engines.parity_report import markdown
from tools.engines.quantize_fp16 import make_fp16
from tools.engines.quantize_int8 import QDQ_OP_TYPES, SELECTION_MARGIN, make_int8, select_float_blocks
from tools.training import dataset as data

FLOAT_BLOCKS = "auto"


# --- reports and manifest ----------------------------------------------------------------------------


def write_report(
    folder: Path, precision: str, report: dict[str, Any], noise: dict[str, Any] | None = None
) -> str:
    stem = f"parity_{precision}"
    (folder / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, f"Parity gate: {precision} vs fp32", noise)
    if report.get("cpu_lowered"):
        cpu = markdown(report["cpu_lowered"], f"{precision} lowered for the CPU vs fp32")
        text += (
            "\nThe table above judges the file as TensorRT reads it. The appliance's ONNX Runtime backend runs"
            " it lowered in memory for the CPU (UINT8 activations, appliance.backends.ort_lowering); the"
            " verdict above requires that form to pass too:\n\n" + "#" + cpu
        )
    extra = [f"- {k}: {v}" for k, v in report.get("build", {}).items()]
    if extra:
        text += "\n## How it was built\n\n" + "\n".join(extra) + "\n"
    if report.get("timing"):
        t = report["timing"]
        text += (
            f"\n## CPU latency (ONNX Runtime, {t['threads']} thread, median of {t['repeats']}, one process)\n\n"
            + "\n".join(
                f"- {k}: {v:.2f} ms ({t['speedup_vs_fp32'].get(k, 1):.2f}x fp32)"
                for k, v in t["median_ms"].items()
            )
            + "\n"
        )
    (folder / f"{stem}.md").write_text(text)
    return f"{stem}.md"


def update_manifest(manifest_path: Path, entries: dict[str, dict[str, str] | None]) -> None:
    content = yaml.safe_load(manifest_path.read_text())
    header = manifest_path.read_text().split("\n", 1)[0]
    for precision, entry in entries.items():
        if entry is None:
            content["onnx"].pop(precision, None)
        else:
            content["onnx"][precision] = entry
    manifest_path.write_text(header + "\n" + yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    load_manifest(manifest_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data.add_model_and_data_arguments(parser)
    parser.add_argument("--calibration-images", type=int, default=96, help="training images to calibrate on")
    parser.add_argument(
        "--selection-images",
        type=int,
        default=256,
        help="other training images to choose the float blocks on (default 256)",
    )
    parser.add_argument("--limit", type=int, help="gate on at most this many validation images (CI)")
    parser.add_argument("--method", default="MinMax", choices=["MinMax", "Percentile", "Entropy"])
    parser.add_argument("--precisions", default="int8,fp16")
    parser.add_argument(
        "--float-blocks",
        default=FLOAT_BLOCKS,
        help="'auto' (default), or keep the stem and this many first blocks float (0: quantise all)",
    )
    parser.add_argument(
        "--bias-correction",
        action="store_true",
        help="INT8: correct each INT8 conv's float bias by its mean output shift on the calibration images",
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--bench-repeats", type=int, default=30, help="latency repeats per model (0: skip)")
    args = parser.parse_args(argv)
    try:
        if args.float_blocks != "auto" and not str(args.float_blocks).isdigit():
            raise UserError(f"--float-blocks {args.float_blocks!r}: 'auto' or a number >= 0")
        manifest = load_manifest(args.model)
        manifest.verify_file(Precision.fp32)
        return quantize(args, manifest)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def quantize(args: argparse.Namespace, manifest: Manifest) -> int:
    folder = data.data_dir(args.data)
    fp32 = manifest.onnx_path(Precision.fp32)
    name = manifest.input.name
    picked = split_records(folder, manifest, "train", args.calibration_images + args.selection_images)
    chosen = set(
        np.linspace(0, len(picked) - 1, min(args.calibration_images, len(picked))).round().astype(int)
    )
    calibration = read_tensors(
        folder, manifest, [r for i, r in enumerate(picked) if i in chosen], "calibration (train)"
    )
    selection = read_tensors(
        folder, manifest, [r for i, r in enumerate(picked) if i not in chosen] or picked, "selection (train)"
    )
    records, val = split_tensors(folder, manifest, "validation", args.limit)
    reference, noise = fp32_reference_and_noise(manifest, folder, records, val, args.threads)
    known = Truth.load(records, folder)
    all_passed, entries, files = True, {}, {"fp32": fp32}
    reports: dict[str, dict[str, Any]] = {}
    for precision in args.precisions.split(","):
        target = manifest.folder / f"model.{precision}.onnx"
        if precision == "int8":
            tried: list[dict[str, Any]] = []
            if args.float_blocks == "auto":
                blocks, tried = select_float_blocks(
                    fp32,
                    target,
                    calibration,
                    selection,
                    manifest,
                    noise["bands"],
                    args.method,
                    args.threads,
                    args.bias_correction,
                )
            else:
                blocks = int(args.float_blocks)
            build = make_int8(fp32, target, calibration, name, args.method, blocks, args.bias_correction)
            build.update(
                {
                    "calibration_images": len(calibration),
                    "calibration_method": args.method,
                    "bias_correction": args.bias_correction,
                    "selection_images": len(selection) if tried else 0,
                    "selection_margin": SELECTION_MARGIN if tried else None,
                    "selection": tried,
                    "qdq_op_types": QDQ_OP_TYPES,
                }
            )
        elif precision == "fp16":
            build = make_fp16(fp32, target)
        else:
            raise UserError(f"unknown precision {precision!r} (int8 or fp16)")
        report = judge(manifest, reference, run(target, val, name, threads=args.threads), noise, known)
        report.update(
            {
                "precision": precision,
                "file": target.name,
                "sha256": sha256_file(target),
                "build": build,
                "noise_file": NOISE_FILE,
                "bands": noise["bands"],
                "calibration_images": len(calibration) if precision == "int8" else 0,
                "calibration_method": args.method if precision == "int8" else None,
                "float_blocks": build.get("float_blocks"),
            }
        )
        if precision == "int8":
            # The appliance's ONNX Runtime backend runs this file lowered for the CPU (UINT8 activations,
            # appliance.backends.ort_lowering): that form must pass the same gate.
            cpu = judge(
                manifest, reference, run(target, val, name, threads=args.threads, lower=True), noise, known
            )
            report["cpu_lowered"] = cpu
            report["passed"] = report["passed"] and cpu["passed"]
            files["int8_cpu"] = target
        reports[precision] = report
        files[precision] = target
        entries[precision] = (
            {"file": target.name, "sha256": report["sha256"], "gate": f"parity_{precision}.md"}
            if report["passed"]
            else None
        )
        all_passed &= report["passed"]
    timing = timings(files, val, name, args.bench_repeats, args.threads) if args.bench_repeats > 0 else None
    for precision, report in reports.items():
        report["timing"] = timing
        md = write_report(manifest.folder, precision, report, noise)
        print(f"{precision}: gate {'PASSED' if report['passed'] else 'FAILED'} ({manifest.folder / md})")
        for check in report["checks"]:
            if not check["ok"]:
                print(f"  failed: {check['check']} = {check['value']} (limit {check['limit']})")
    if timing:
        print("latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in timing["median_ms"].items()))
    update_manifest(manifest.folder / "manifest.yaml", entries)
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
