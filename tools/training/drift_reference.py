"""Write the drift watch's reference into a model's manifest: the validation patients' distributions.

    .venv/bin/cxr-drift-reference [--model engines/cxr-lite0] [--data DIR] [--bins 10]

Every validation image (split.json, as tools/training/evaluate.py chooses them) goes through the appliance's own
`Analyzer`, exactly as the daemon runs it; appliance.ops.drift.observations takes the monitored
quantities from each Result and its decoded pixels, and each quantity gets fixed quantile bins and the
smoothed share of the validation observations per bin. The result replaces the manifest's `drift:`
section (the rest of the file is kept; the manifest is validated after writing). Re-run it whenever
the model or its operating points change: tools/training/export_onnx.py writes a manifest without one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from appliance.assemble import job_for_file
from appliance.errors import UserError
from appliance.manifest import DriftReference, load_manifest
from appliance.ops.drift import SMOOTHING, Observation, observations, reference_quantity
from tools.training import dataset as data
from tools.training.evaluate_images import choose_records, make_analyzer

BATCH = 8
# Fewer validation observations than this give a reference noisier than the window it judges.
MIN_OBSERVATIONS = 50


def collect(
    model: Path, folder: Path, split: str, precision: str, threads: int
) -> tuple[dict[str, list[Observation]], int, str]:
    manifest = load_manifest(model)
    records, split = choose_records(folder, manifest.folder, dict(manifest.training), split)
    if not records:
        raise UserError(f"{folder}: no images (split {split!r})")
    analyzer = make_analyzer(model, precision, threads)
    values: dict[str, list[Observation]] = {}
    paths = [folder / r.file for r in records]
    for start in tqdm(range(0, len(paths), BATCH), desc="drift reference", unit="batch", mininterval=5):
        jobs = [job_for_file(path, source="reference") for path in paths[start : start + BATCH]]
        for job, result in zip(jobs, analyzer.analyze(jobs), strict=True):
            pixels = job.image.pixels if job.image is not None else None
            for name, value in observations(result, pixels).items():
                values.setdefault(name, []).append(value)
    analyzer.backend.close()
    return values, len(paths), split


def build_reference(
    values: Mapping[str, Sequence[Observation]], images: int, source: str, bins: int
) -> DriftReference:
    quantities = {}
    for name, observed in sorted(values.items()):
        if len(observed) < MIN_OBSERVATIONS:
            print(f"  {name}: {len(observed)} observations, under {MIN_OBSERVATIONS}: not monitored")
            continue
        quantity = reference_quantity(observed, bins=bins, smoothing=SMOOTHING)
        if quantity is None:
            print(f"  {name}: a single value on validation: not monitored")
            continue
        quantities[name] = quantity
    return DriftReference(source=source, images=images, smoothing=SMOOTHING, quantities=quantities)


def write_reference(manifest_path: Path, reference: DriftReference) -> None:
    """Replace the `drift:` section, keeping the header line and everything else (like quantize.py)."""
    text = manifest_path.read_text(encoding="utf-8")
    header = text.split("\n", 1)[0] if text.startswith("#") else ""
    content: dict[str, Any] = yaml.safe_load(text)
    content["drift"] = reference.model_dump(mode="json")
    for quantity in content["drift"]["quantities"].values():  # edges or categories, not both
        for key in ("edges", "categories"):
            if not quantity[key]:
                del quantity[key]
    body = yaml.safe_dump(content, sort_keys=False, allow_unicode=True)
    manifest_path.write_text((header + "\n" if header else "") + body, encoding="utf-8")
    load_manifest(manifest_path)  # refuse to leave an invalid manifest behind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=data.REPO / "engines" / "cxr-lite0" / "manifest.yaml")
    parser.add_argument("--data", help="the model's training data folder (default $CXR_DATA)")
    parser.add_argument("--split", default="validation", choices=["validation", "auto", "all"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--bins", type=int, default=10, help="quantile bins per numeric quantity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model = args.model / "manifest.yaml" if args.model.is_dir() else args.model
    try:
        folder = data.data_dir(args.data)
        values, images, split = collect(model, folder, args.split, args.precision, args.threads)
        source = f"{split} split of {folder.name} (split.json), {args.precision}, {images} images"
        reference = build_reference(values, images, source, args.bins)
        write_reference(model, reference)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, quantity in reference.quantities.items():
        print(f"  {name}: {quantity.kind}, {len(quantity.proportions)} bins, n={quantity.n}")
    print(f"wrote drift reference ({len(reference.quantities)} quantities, {images} images) into {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
