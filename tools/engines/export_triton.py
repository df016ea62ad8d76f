#!/usr/bin/env python3
"""Write a Triton Inference Server model repository for a model manifest (the scale-out path).

    # the FP32 ONNX, served by Triton's ONNX Runtime backend on the server's GPU
    python -m tools.engines.export_triton --model engines/cxr-lite0/manifest.yaml --out /srv/triton-models
    # a TensorRT engine from the engine cache (built ON the server by tools/engines/build_engine.py)
    python -m tools.engines.export_triton --model engines/cxr-lite0 --out /srv/triton-models \\
        --plan engines/cxr-lite0/cache/cxr-lite0.fp16.<key>.engine

Layout written (Triton's own):  OUT/<model>/config.pbtxt
                                OUT/<model>/<version>/model.onnx   or   model.plan
                                OUT/<model>/<version>/manifest.yaml   (copy, for provenance)

config.pbtxt declares the inputs/outputs (names, types, dims without the batch axis, read from the
ONNX graph), max_batch_size, dynamic batching and the instance group, and records the provenance
in `parameters` (model_sha256 = the ONNX sha256, precision, onnx_precision, manifest name/version;
for a plan also the engine's sha256, GPU and TensorRT version). The appliance's `triton` backend
reads these back and refuses a served model that does not match its manifest.

Exit codes: 0 written, 2 user error (bad option, missing or changed file, unusable engine).

Beside this file: triton_graph.py (the tensors, from the ONNX graph) and triton_config.py (the plan and
config.pbtxt's text).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from appliance.backends.triton import PARAM_PRECISION, PARAM_SHA256
from appliance.errors import ApplianceError, UserError
from appliance.manifest import Manifest, Precision, load_manifest, sha256_file
from tools.engines.triton_config import RepositoryPlan, plan_repository, render_config

say = functools.partial(print, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model manifest (YAML) or its folder")
    parser.add_argument("--out", required=True, help="model repository folder (created if missing)")
    parser.add_argument(
        "--precision", choices=[p.value for p in Precision], help="which ONNX of the manifest (default fp32)"
    )
    parser.add_argument(
        "--plan", help="serve this TensorRT engine from the engine cache (its sidecar is read)"
    )
    parser.add_argument(
        "--allow-unchecked-plan",
        action="store_true",
        help="accept an engine that has not passed tools/engines/check_parity.py yet (never one that failed)",
    )
    parser.add_argument("--name", help="model name in the repository (default: the manifest's name)")
    parser.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    parser.add_argument(
        "--max-batch", type=int, help="max_batch_size (default 8; a plan: its optimisation profile's max)"
    )
    parser.add_argument(
        "--preferred-batch",
        help="comma-separated preferred batch sizes for the dynamic batcher (default: powers of two up to max)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="how long the dynamic batcher waits to fill a batch (default 500 µs)",
    )
    parser.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    parser.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU"], default="KIND_GPU")
    parser.add_argument("--force", action="store_true", help="replace an existing version folder")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- writing


def _copy_verified(source: Path, target: Path, sha256: str) -> None:
    shutil.copyfile(source, target)
    if sha256_file(target) != sha256:
        raise UserError(
            f"{target}: the copy does not match {source}'s sha256 (disk or file changed during copy)"
        )


def write_repository(plan: RepositoryPlan, manifest: Manifest, out: Path, force: bool) -> Path:
    """Write OUT/<name>/<version>/ and OUT/<name>/config.pbtxt; nothing half-written on failure."""
    model_dir = out / plan.name
    version_dir = model_dir / str(plan.version)
    if version_dir.exists() and not force:
        raise UserError(f"{version_dir}: already exists; give --force to replace it or --version N")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{model_dir}: cannot create: {exc.strerror}") from exc
    # Build the version folder beside its final place, then swap it in: Triton polling the
    # repository never sees a version without its model file.
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{plan.version}.", suffix=".tmp"))
    try:
        say(f"copying {plan.source} -> {version_dir / plan.model_file}")
        _copy_verified(plan.source, staging / plan.model_file, plan.source_sha256)
        shutil.copyfile(manifest.folder / "manifest.yaml", staging / "manifest.yaml")
        if version_dir.exists():
            shutil.rmtree(version_dir)
        staging.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
        os.replace(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    config_path = model_dir / "config.pbtxt"
    temporary = config_path.with_name(".config.pbtxt.tmp")
    temporary.write_text(render_config(plan), encoding="utf-8")
    os.replace(temporary, config_path)
    return config_path


def export(args: argparse.Namespace) -> int:
    manifest = load_manifest(Path(args.model))
    say(f"model       {manifest.name} {manifest.version} ({manifest.folder})")
    plan = plan_repository(args, manifest)
    say(
        f"serving     {plan.platform} ({plan.parameters[PARAM_PRECISION]}), sha256 {plan.parameters[PARAM_SHA256][:12]}…"
    )
    say(
        f"batching    max {plan.max_batch}, preferred {plan.preferred_batch}, queue delay {plan.queue_delay_us} µs"
    )
    say(f"instances   {plan.instances} x {plan.kind}")
    for tensor in plan.inputs + plan.outputs:
        say(f"tensor      {tensor.name}: {tensor.data_type} {list(tensor.dims)}")
    config_path = write_repository(plan, manifest, Path(args.out), args.force)
    say(f"wrote       {config_path}")
    if plan.platform == "tensorrt_plan":
        say(
            f"note: the engine runs only on {plan.parameters['gpu_name']} (sm {plan.parameters['compute_capability']})"
            f" with TensorRT {plan.parameters['tensorrt_version']}: the Triton server must match"
        )
    say(f"serve with  tritonserver --model-repository {Path(args.out).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return export(args)
    except ApplianceError as exc:  # UserError, ManifestError: a plain message
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
