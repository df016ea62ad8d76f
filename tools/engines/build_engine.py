#!/usr/bin/env python3
"""Build the TensorRT engine for this device from the model's ONNX, into the engine cache.

    # on the Jetson (first boot: systemd/cxr-engine-build.service runs the --if-needed form)
    python -m tools.engines.build_engine --config /etc/cxr-appliance/config.yaml --if-needed --check-parity
    # anywhere, TensorRT or not: show the plan, the cache key and the equivalent trtexec command
    python -m tools.engines.build_engine --model engines/cxr-lite0 --precision int8 --dry-run \\
        --gpu-name Orin --compute-capability 8.7 --tensorrt-version 10.3.0 --l4t R36.4.3

Precision fp16 builds from the FP32 ONNX. int8/best build from the explicit Q/DQ ONNX
(tools/engines/quantize.py) on TensorRT >= 10, and on TensorRT 8.x calibrate the FP32 ONNX on real images
(--calibration-images, default the CXR data folder; the calibration cache is kept next to the engine).

Exit codes: 0 built / up to date / dry run, 1 parity gate failed (engine recorded as refused),
2 user error (no TensorRT here, bad option, missing file).
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from appliance.backends.select import parity_refusal
from appliance.backends.tensorrt import (
    EnginePlan,
    build_engine,
    calibration_id_for,
    current_device,
    import_tensorrt,
    plan_engine,
    trtexec_command,
)
from appliance.engine_cache import DeviceIdentity, EngineMismatch, find_engine, read_l4t_release
from appliance.errors import ApplianceError, BackendUnavailable, UserError
from appliance.ingest import read_image
from appliance.manifest import Manifest
from appliance.preprocess import preprocess
from tools.engines import check_parity
from tools.engines.engine_target import add_target_arguments, load_target
from tools.training import dataset

say = functools.partial(print, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_target_arguments(parser)
    parser.add_argument(
        "--int8-source", choices=["qdq", "calibration"], help="default: qdq on TensorRT >= 10"
    )
    parser.add_argument("--calibration-images", help="TensorRT 8.x INT8: image folder or CXR data folder")
    parser.add_argument("--calibration-count", type=int, default=256)
    parser.add_argument("--if-needed", action="store_true", help="do nothing when a matching engine exists")
    parser.add_argument(
        "--check-parity", action="store_true", help="run tools/engines/check_parity.py and record it"
    )
    parser.add_argument("--parity-data", help="images for the parity check (default $CXR_DATA)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print plan, key and trtexec command; build nothing"
    )
    target = parser.add_argument_group("target device for --dry-run where TensorRT is absent")
    target.add_argument("--gpu-name", default="unknown-gpu")
    target.add_argument("--compute-capability", default="unknown")
    target.add_argument("--tensorrt-version", default="10.0.0", help="default 10.0.0 (JetPack 6)")
    target.add_argument("--l4t", default=None, help="e.g. R36.4.3 (default: this machine's, if a Jetson)")
    return parser.parse_args(argv)


def this_device(args: argparse.Namespace, device_index: int = 0) -> DeviceIdentity:
    """The real device (tensorrt.device_index); on a machine without TensorRT a plain UserError (or, for
    --dry-run, the target given)."""
    try:
        import_tensorrt()
        return current_device(device_index)
    except BackendUnavailable as exc:
        if args.dry_run:
            say(f"note: {exc}; planning for the target given on the command line")
            return DeviceIdentity(
                gpu_name=args.gpu_name,
                compute_capability=args.compute_capability,
                tensorrt_version=args.tensorrt_version,
                l4t_release=args.l4t or read_l4t_release(),
            )
        if "TensorRT" in str(exc):
            raise UserError(
                f"TensorRT is not installed here; build engines on the Jetson (JetPack ships TensorRT and"
                f" python3-pycuda), or add --dry-run to see the plan. ({exc})"
            ) from exc
        raise UserError(f"no usable CUDA GPU here: {exc}") from exc


def show_plan(plan: EnginePlan) -> None:
    spec = plan.spec
    say(f"model       {spec.model}  ({plan.onnx_path}, sha256 {spec.onnx_sha256[:12]}…)")
    say(f"precision   {spec.precision}  flags {'+'.join(plan.flags)}  int8 source {spec.int8_source or '-'}")
    say(
        f"batch       min {spec.min_batch} / opt {spec.opt_batch} / max {spec.max_batch}, input {spec.input_shape}"
    )
    say(f"workspace   {spec.workspace_mb} MiB   DLA {spec.dla_core if spec.dla_core is not None else 'off'}")
    device = plan.device
    say(
        f"device      {device.gpu_name} (sm {device.compute_capability}), TensorRT {device.tensorrt_version},"
        f" L4T {device.l4t_release or '-'}"
    )
    say(f"cache key   {plan.key}")
    say(f"engine      {plan.engine_path}")
    say(f"sidecar     {plan.sidecar_path}")
    say(f"timing      {plan.timing_cache}")
    say(f"trtexec     {shlex.join(trtexec_command(plan))}")


def calibration_files(args: argparse.Namespace) -> list[Path]:
    given = args.calibration_images
    folder = Path(given) if given else dataset.data_dir(None)
    if (folder / "metadata.csv").is_file():
        # A CXR data folder: frontal X-rays only, the population the model sees on the ward.
        files = [folder / r.file for r in dataset.load_records(folder) if r.is_cxr and not r.is_dicom]
    else:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    if not files:
        raise UserError(f"{folder}: no calibration images found")
    step = max(1, len(files) // args.calibration_count)
    return files[::step][: args.calibration_count]


def calibration_batches(files: list[Path], manifest: Manifest, batch: int) -> Iterator[np.ndarray]:
    samples: list[np.ndarray] = []
    for path in files:
        image = read_image(path, target_size=max(manifest.input.height, manifest.input.width))
        samples.append(preprocess(image.pixels, manifest.input)[0])
        if len(samples) == batch:
            yield np.stack(samples)
            samples = []


def run_parity(args: argparse.Namespace, model: Path, plan: EnginePlan) -> bool:
    argv = ["--model", str(model), "--candidate", "tensorrt", "--record"]
    argv += ["--config", args.config] if args.config else []
    argv += ["--cache", args.cache] if args.cache else []
    argv += ["--data", args.parity_data] if args.parity_data else []
    argv += ["--precision", plan.spec.precision, "--max-batch", str(plan.spec.max_batch)]
    # The engine just built, whatever the command line changed from the config
    argv += ["--workspace-mb", str(plan.spec.workspace_mb)]
    argv += ["--dla-core", str(plan.spec.dla_core)] if plan.spec.dla_core is not None else []
    return check_parity.check(check_parity.parse_args(argv)).passed


def build(args: argparse.Namespace) -> int:
    target = load_target(args)
    manifest, config = target.manifest, target.config
    device = this_device(args, config.device_index)
    plan = plan_engine(
        manifest, config, device, target.precision, target.max_batch, int8_source=args.int8_source
    )
    show_plan(plan)
    if args.int8_source is not None:
        try:
            loaded = plan_engine(manifest, config, device, target.precision, target.max_batch).engine_path
        except ApplianceError:  # e.g. no Q/DQ ONNX: the appliance cannot plan an INT8 engine at all
            loaded = None
        if plan.engine_path != loaded:
            if args.check_parity or args.if_needed:  # both find the engine the appliance plans, not this one
                raise UserError(
                    f"--int8-source {args.int8_source} builds an engine the appliance does not plan on this"
                    " device: --check-parity and --if-needed would look at another engine; leave them out"
                )
            say(
                f"warning: --int8-source {args.int8_source} is not what the appliance plans on this device:"
                " it will not load this engine (for comparisons only)"
            )
    if args.dry_run:
        return 0
    if args.if_needed:
        try:
            _, record = find_engine(plan.engine_path.parent, plan.spec, device)
        except EngineMismatch as exc:
            say(f"engine needed: {exc}")
        else:
            refusal = parity_refusal(record, config.model_copy(update={"require_parity": args.check_parity}))
            if refusal is None:
                say("engine up to date for this device; nothing to do")
                return 0
            if record.parity is not None:  # failed before: rebuilding the same thing gives the same engine
                say(f"error: {refusal}", file=sys.stderr)
                return 1
            say("engine present but not parity-checked yet")
            return 0 if run_parity(args, manifest.folder, plan) else 1
    batches, calibration_id = None, None
    if plan.calibration_cache is not None and not plan.calibration_cache.is_file():
        files = calibration_files(args)
        say(f"calibration: {len(files)} images")
        calibration_id = calibration_id_for(files)
        batches = calibration_batches(files, manifest, 8)
    build_engine(
        plan,
        progress=say,
        calibration_batches=batches,
        calibration_id=calibration_id,
        device_index=config.device_index,
    )
    if args.check_parity and not run_parity(args, manifest.folder, plan):
        say("error: the engine FAILED the parity gate; it is recorded as refused and will not be loaded")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return build(args)
    except ApplianceError as exc:  # UserError, BackendUnavailable: a plain message
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
