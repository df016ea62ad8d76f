"""What the CPU-side engine tools run: the model's split images, read and preprocessed as the cart does
it, and an ONNX file run on them with ONNX Runtime (as it is, or lowered for the CPU as the appliance's
backend runs it), also timed. Shared by quantize, its INT8 float-block selection and the parity gate CLI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from appliance.backends.ort_lowering import load_lowered
from appliance.errors import UserError
from appliance.manifest import Manifest
from tools.training import dataset as data


def split_records(folder: Path, manifest: Manifest, which: str, limit: int | None) -> list[data.Record]:
    split = data.read_split(manifest.folder / "split.json")[which]
    records = [r for r in data.load_records(folder) if r.patient_id in split and not r.is_dicom]
    if limit:
        records = records[:: max(1, len(records) // limit)][:limit]
    if not records:
        raise UserError(f"{folder}: no {which} images of the model's split found")
    return records


def read_tensors(folder: Path, manifest: Manifest, records: list[data.Record], desc: str) -> np.ndarray:
    """The appliance's reading (reduced-size JPEG decoding) and preprocessing, as the cart does it."""
    return np.stack(
        [
            data.tensor(data.read_pixels(folder / r.file, manifest.input), manifest.input)
            for r in tqdm(records, desc=desc)
        ]
    )


def split_tensors(
    folder: Path, manifest: Manifest, which: str, limit: int | None
) -> tuple[list[data.Record], np.ndarray]:
    records = split_records(folder, manifest, which, limit)
    return records, read_tensors(folder, manifest, records, which)


def session(path: Path, threads: int = 1, lower: bool = False) -> ort.InferenceSession:
    """`lower`: the INT8 file as the appliance's ONNX Runtime backend runs it on the CPU (rewritten in
    memory by appliance.backends.ort_lowering); else the file as it is (what TensorRT reads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model: str | bytes = load_lowered(path)[0] if lower else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(
    path: Path, x: np.ndarray, input_name: str, batch: int = 16, threads: int = 1, lower: bool = False
) -> dict[str, np.ndarray]:
    sess = session(path, threads, lower)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(x), batch):
        for name, value in zip(names, sess.run(names, {input_name: x[start : start + batch]}), strict=True):
            parts[name].append(np.asarray(value, dtype=np.float32))
    return {n: np.concatenate(v) for n, v in parts.items()}


def timings(
    files: dict[str, Path], x: np.ndarray, input_name: str, repeats: int, threads: int
) -> dict[str, Any]:
    """Median latency per file at batch 1 and 4, interleaved in one process so load changes hit all.
    A key ending in "_cpu" runs its file lowered for the CPU (as the appliance's backend does)."""
    sessions = {k: session(p, threads, lower=k.endswith("_cpu")) for k, p in files.items()}
    samples: dict[str, list[float]] = {f"{k}.b{b}": [] for k in files for b in (1, 4)}
    for _ in range(3):
        for s in sessions.values():
            for b in (1, 4):
                s.run(None, {input_name: x[:b]})
    for _ in range(repeats):
        for k, s in sessions.items():
            for b in (1, 4):
                start = time.perf_counter()
                s.run(None, {input_name: x[:b]})
                samples[f"{k}.b{b}"].append((time.perf_counter() - start) * 1000)
    median = {k: float(np.median(v)) for k, v in samples.items()}
    speedup = {
        k: median[f"fp32.b{k.rsplit('.b', 1)[1]}"] / v for k, v in median.items() if "fp32.b1" in samples
    }
    return {"threads": threads, "repeats": repeats, "median_ms": median, "speedup_vs_fp32": speedup}
