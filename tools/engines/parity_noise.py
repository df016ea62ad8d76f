"""The FP32 model's own reading noise, which sets the parity gate's bounds (docs/parity.md).

Measured on the gate's images three ways: decoded at full resolution instead of with the appliance's
reduced-size (DCT-scaled) decoding (where the two reads differ: the band's source), FP32 again with
another thread count and batch size, and a JPEG re-encoding (the band's source when too few images read
differently). Stored in <model>/parity_noise.json with a fingerprint of the FP32 model and the image set,
and measured again when that changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.errors import InputRejected, UserError
from appliance.manifest import Manifest, Precision, sha256_file
from appliance.preprocess import preprocess
from tools.engines.onnx_runs import run
from tools.engines.parity_scores import deviation, mask_threshold, scores, values
from tools.training import dataset

MIN_NOISE_IMAGES = 30  # fewer images whose two reads differ: the band falls back to the re-encoding noise
JPEG_QUALITY = 95  # the re-encoded copy: the smallest JPEG loss a PACS export commonly applies
NOISE_FILE = "parity_noise.json"
NOISE_VERSION = 2  # stored noise of another version is measured again
BAND_SOURCE = "decode"

# One more FP32 run over input tensors (outputs by name): the reference again, or otherwise configured.
Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def _stats(values_: np.ndarray) -> dict[str, float]:
    v = values_[~np.isnan(values_)]
    if not len(v):
        return {"n": 0}
    return {
        "n": len(v),
        "mean": float(v.mean()),
        "p50": float(np.percentile(v, 50)),
        "p95": float(np.percentile(v, 95)),
        "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
    }


def noise_stats(
    manifest: Manifest, reference: dict[str, np.ndarray], other: dict[str, np.ndarray], rows: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per score: |Δ| between the FP32 outputs of the gate's images (rows of `reference`) and `other`."""
    sub = {k: np.asarray(v)[rows] for k, v in reference.items()}
    result = {}
    for score in scores(manifest):
        threshold = mask_threshold(manifest, score) if score.kind == "mask" else 0.5
        ref = values(score, manifest, sub)
        alt = values(score, manifest, other)
        result[score.key] = _stats(deviation(score, ref, alt, threshold))
    return result


@dataclass
class ReadingVariants:
    """The same images read two other ways: full-resolution decoding (only where that differs from the
    appliance's reduced-size decoding) and a JPEG re-encoding of the decoded pixels."""

    full: np.ndarray
    full_rows: np.ndarray
    reencoded: np.ndarray


def reading_variants(
    data: Path, records: Sequence[dataset.Record], manifest: Manifest, quality: int = JPEG_QUALITY
) -> ReadingVariants:
    from appliance.ingest import read_image

    size = max(manifest.input.height, manifest.input.width)
    full, rows, reencoded = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "copy.jpg"
        for i, record in enumerate(records):
            path = data / record.file
            try:
                fast = read_image(path, target_size=size).pixels
                whole = read_image(path, target_size=None).pixels
            except InputRejected as exc:
                raise UserError(f"{path}: {exc}") from exc
            if fast.shape != whole.shape or not np.array_equal(fast, whole):
                full.append(preprocess(whole, manifest.input)[0])
                rows.append(i)
            grey = Image.fromarray(np.clip(np.round(whole * 255), 0, 255).astype(np.uint8), mode="L")
            buffer = io.BytesIO()
            grey.save(buffer, format="JPEG", quality=quality)
            copy.write_bytes(buffer.getvalue())
            reencoded.append(preprocess(read_image(copy, target_size=size).pixels, manifest.input)[0])
    shape = (0, *np.shape(reencoded[0])) if reencoded else (0,)
    return ReadingVariants(
        np.stack(full) if full else np.zeros(shape, np.float32),
        np.asarray(rows, dtype=int),
        np.stack(reencoded) if reencoded else np.zeros(shape, np.float32),
    )


def measure_noise(
    manifest: Manifest,
    inputs: np.ndarray,
    reference: dict[str, np.ndarray],
    variants: ReadingVariants,
    run_reference: Runner,
    run_other_config: Runner,
) -> dict[str, Any]:
    """FP32 score noise on the gate's images, per score and source (see docs/parity.md)."""
    everything = np.arange(len(inputs))
    sources: dict[str, Any] = {
        "runtime": {
            "what": "FP32 again with another thread count and batch size (same tensors)",
            "n_images": len(inputs),
            "scores": noise_stats(manifest, reference, run_other_config(inputs), everything),
        },
        "decode": {
            "what": "FP32 on the full-resolution decode vs the appliance's reduced-size (DCT-scaled) decode,"
            " on the images where the two reads differ",
            "n_images": len(variants.full_rows),
            "scores": noise_stats(manifest, reference, run_reference(variants.full), variants.full_rows)
            if len(variants.full_rows)
            else {},
        },
        "reencode": {
            "what": f"FP32 on the same pixels re-encoded as JPEG quality {JPEG_QUALITY} (a PACS export)",
            "n_images": len(inputs),
            "scores": noise_stats(manifest, reference, run_reference(variants.reencoded), everything),
        },
    }
    source = BAND_SOURCE if len(variants.full_rows) >= MIN_NOISE_IMAGES else "reencode"
    bands = {
        key: {
            "band": stats.get("max", 0.0),
            "p99": stats.get("p99", 0.0),
            "mean": stats.get("mean", 0.0),
            "source": source,
            "n": stats.get("n", 0),
        }
        for key, stats in sources[source]["scores"].items()
    }
    rows = variants.full_rows if source == BAND_SOURCE else everything
    return {"sources": sources, "band_source": source, "bands": bands, "band_rows": [int(r) for r in rows]}


def fingerprint(manifest: Manifest, records: Sequence[dataset.Record]) -> dict[str, str]:
    files = "\n".join(r.file for r in records).encode()
    return {
        "noise_version": str(NOISE_VERSION),
        "fp32_sha256": sha256_file(manifest.onnx_path(Precision.fp32)),
        "images_sha256": hashlib.sha256(files).hexdigest(),
    }


def load_or_measure_noise(
    manifest: Manifest,
    data: Path,
    records: Sequence[dataset.Record],
    inputs: np.ndarray,
    reference: dict[str, np.ndarray],
    run_reference: Runner,
    run_other_config: Runner,
    path: Path | None = None,
) -> dict[str, Any]:
    """The noise for this FP32 model and image set from <model>/parity_noise.json, measured if stale."""
    path = path or manifest.folder / NOISE_FILE
    key = fingerprint(manifest, records)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == key:
                return dict(stored)
        except ValueError:
            pass
    variants = reading_variants(data, records, manifest)
    noise = measure_noise(manifest, inputs, reference, variants, run_reference, run_other_config)
    noise["fingerprint"] = key
    try:
        path.write_text(json.dumps(noise, indent=1) + "\n")
    except OSError as exc:  # a read-only model folder on a cart: measured again next time
        print(f"note: noise not stored ({exc})", file=sys.stderr)
    return noise


def fp32_reference_and_noise(
    manifest: Manifest, data: Path, records: Sequence[dataset.Record], inputs: np.ndarray, threads: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The FP32 model's outputs on `inputs` and the reading noise around them (stored or measured): what
    every gated precision is compared against. The second configuration is batch 1 on one more thread."""
    fp32, name = manifest.onnx_path(Precision.fp32), manifest.input.name
    reference = run(fp32, inputs, name, threads=threads)
    noise = load_or_measure_noise(
        manifest,
        data,
        records,
        inputs,
        reference,
        lambda x: run(fp32, x, name, threads=threads),
        lambda x: run(fp32, x, name, batch=1, threads=threads + 1),
    )
    return reference, noise
