"""Which engine a command means: the model, the TensorRT settings, precision and max batch from the
appliance config, then the command line's own overrides. build_engine builds it and check_parity finds
it with the same options, so an engine built with --workspace-mb or --dla-core is the one checked."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from appliance.backends.select import tensorrt_settings
from appliance.backends.tensorrt import OPT_BATCH, TensorRTConfig
from appliance.config import InferenceConfig, load_config
from appliance.errors import UserError
from appliance.manifest import Manifest, load_manifest

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "engines" / "cxr-lite0"


@dataclass(frozen=True)
class Target:
    manifest: Manifest
    config: TensorRTConfig
    precision: str  # inference.precision (auto = fp16 engine)
    max_batch: int  # inference.max_batch: the profile's max


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both tools take to name the engine."""
    parser.add_argument(
        "--config", help="appliance config YAML: model, inference.precision/max_batch and TensorRT settings"
    )
    parser.add_argument("--model", help="model manifest or its folder (overrides the config's)")
    parser.add_argument("--precision", choices=["auto", "fp16", "int8", "best"], help="auto = fp16")
    parser.add_argument("--workspace-mb", type=int, help="default: the config's tensorrt.workspace_mb")
    parser.add_argument(
        "--max-batch", type=int, help="the profile is 1 / 1 / max batch (inference.max_batch)"
    )
    parser.add_argument("--opt-batch", type=int, help=argparse.SUPPRESS)  # gone: refused below, by name
    parser.add_argument("--dla-core", type=int, help="build for this DLA core (GPU fallback on)")
    parser.add_argument("--cache", help="engine cache folder (default: the config's, else <model>/cache)")


def load_target(args: argparse.Namespace) -> Target:
    if args.opt_batch is not None and args.opt_batch != OPT_BATCH:
        raise UserError(
            f"--opt-batch {args.opt_batch}: the engine profile's optimum is always {OPT_BATCH} now;"
            " one batch setting, --max-batch (inference.max_batch), sets its max"
        )
    inference = load_config(Path(args.config)).inference if args.config else InferenceConfig()
    model = Path(args.model) if args.model else (inference.model if args.config else DEFAULT_MODEL)
    config = tensorrt_settings(inference)
    overrides = {
        "workspace_mb": args.workspace_mb,
        "dla_core": args.dla_core,
        "engine_cache": Path(args.cache) if args.cache else None,
    }
    values = config.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    try:
        config = TensorRTConfig.model_validate(values)
    except ValueError as exc:
        raise UserError(f"invalid engine settings: {exc}") from exc
    precision = args.precision or inference.precision
    max_batch = inference.max_batch if args.max_batch is None else args.max_batch
    return Target(load_manifest(model), config, precision, max_batch)
