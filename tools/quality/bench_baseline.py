"""The newcomer's baseline the bench compares against (tools/quality/bench.py): pydicom `pixel_array` at
full resolution (float64) -> PIL resize -> ONNX Runtime with default session options, one image at a time,
each result published with paho (QoS 1, waiting for the PUBACK); its end to end starts at the closed file."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from appliance.ingest import sniff
from appliance.manifest import Manifest, Precision
from appliance.preprocess import normalise
from testsupport.mosquitto import Broker
from tools.quality.bench_inputs import Inputs
from tools.quality.bench_timing import summary, timed


class Baseline:
    """pydicom pixel_array at full resolution -> float64 min/max -> PIL resize -> ORT defaults."""

    def __init__(self, manifest: Manifest, broker: Broker | None) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        self.session = ort.InferenceSession(
            os.fspath(manifest.onnx_path(Precision.fp32)), providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.client = None
        if broker is not None:
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion

            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"baseline-{os.getpid()}")
            self.client.connect(broker.host, broker.port)
            self.client.loop_start()

    def pixels(self, path: Path) -> np.ndarray:
        from PIL import Image

        if sniff(path) == "dicom":
            import pydicom
            from pydicom.pixels import apply_voi_lut

            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float64)
            if "WindowCenter" in ds:
                arr = apply_voi_lut(arr, ds)
            arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                arr = 1.0 - arr
            return arr
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.float64) / 255.0

    def tensor(self, pixels: np.ndarray) -> np.ndarray:
        from PIL import Image

        spec = self.manifest.input
        src_h, src_w = pixels.shape
        scale = min(spec.height / src_h, spec.width / src_w)
        new_h, new_w = max(1, round(src_h * scale)), max(1, round(src_w * scale))
        resized = np.asarray(Image.fromarray(pixels.astype(np.float32), mode="F").resize((new_w, new_h)))
        canvas = np.full((spec.height, spec.width), spec.pad_value, dtype=np.float32)
        top, left = (spec.height - new_h) // 2, (spec.width - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = resized
        return normalise(canvas, spec)[None]

    def process(self, path: Path) -> dict[str, float]:
        times: dict[str, float] = {}
        pixels, times["decode"] = timed(lambda: self.pixels(path))
        tensor, times["preprocess"] = timed(lambda: self.tensor(pixels))
        outputs, times["infer"] = timed(lambda: self.session.run(None, {self.input_name: tensor}))
        payload = json.dumps({"file": path.name, "scores": [np.asarray(o).ravel().tolist() for o in outputs]})
        client = self.client
        if client is not None:
            _, times["publish"] = timed(
                lambda: client.publish("baseline/result", payload, qos=1).wait_for_publish(10)
            )
        return times

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def measure_baseline(
    baseline: Baseline, inputs: Inputs, per_category: int, backlog: list[Path]
) -> dict[str, Any]:
    latencies: dict[str, Any] = {}
    stages: dict[str, list[float]] = {}
    for paths in inputs.categories.values():
        baseline.process(paths[0])  # warm-up
    for category, paths in inputs.categories.items():
        values = []
        for index in range(min(per_category, len(paths) * per_category)):
            times, total = timed(partial(baseline.process, paths[index % len(paths)]))
            values.append(total)
            for name, value in times.items():
                stages.setdefault(name, []).append(value)
        latencies[category] = summary(values)
    _, elapsed = timed(lambda: [baseline.process(p) for p in backlog])
    return {
        "e2e_ms": latencies,
        "stages_ms": {name: summary(v)["median"] for name, v in stages.items()},
        "backlog": {
            "files": len(backlog),
            "seconds": round(elapsed / 1000.0, 2),
            "images_per_s": round(len(backlog) / (elapsed / 1000.0), 3),
        },
    }
