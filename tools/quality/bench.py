"""Benchmark: the appliance against a newcomer's baseline, on the same files, in one run.

    python -m tools.quality.bench --json bench.json            # full run (a few minutes on 2 cores)
    python -m tools.quality.bench --quick --json bench.json    # CI smoke: a handful of files, no targets asserted

Writes OUT (JSON) and OUT.md (a table: each figure, the baseline's, the ratio, the target).

Inputs: the real DICOMs and some real images of the shared data set ($CXR_DATA, default
../shared/data/cxr), plus cart-sized DICOMs made from real images by tools/quality/gen_cart_dicoms.py in each
transfer syntax a cart sends. Every measurement has a warm-up and repeats; medians, p95 and p99.

What is measured
- stages (in process, per syntax): file-closed detection (FolderWatcher + inotify), read (header
  parse), decode (pixels to float [0, 1], what the decoder needs beyond the header), preprocess,
  inference, interpret, MQTT publish to PUBACK (the appliance's outbox + publisher, real Mosquitto).
- end to end: the real daemon (`cxr-appliance run`, a subprocess with an sd_notify socket and a real
  Mosquitto); a file is written into the watched folder and closed, and the clock stops when a
  subscriber receives the result (the broker forwards it as it acknowledges it).
- backlog: N files (default 500) renamed into the inbox at once; throughput until the last result.
- peak RSS (VmHWM) of the daemon, start-up time to READY=1.
- each precision the model ships (fp32, fp16, int8 Q/DQ) on ONNX Runtime CPU: speed and the score
  delta against fp32 on real images; TensorRT when importable (else skipped with the reason).
- BASELINE: pydicom `pixel_array` at full resolution (float64) -> PIL resize -> ONNX Runtime with
  default session options, one image at a time, publishing each result with paho (QoS 1, waiting for
  the PUBACK). Its end-to-end figure starts at the closed file (no folder watching: in its favour).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.config import AppConfig, DeviceConfig, MqttConfig
from appliance.ingest import dicom as dicom_reader
from appliance.ingest import sniff
from appliance.ingest.watcher import FolderWatcher
from appliance.manifest import Manifest, Precision, load_manifest
from appliance.pipeline import Analyzer, Job
from appliance.preprocess import normalise
from appliance.publish.mqtt import MqttPublisher
from appliance.publish.outbox import Outbox
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Subscriber
from tools.quality.gen_cart_dicoms import SYNTAXES, frontal_sources, generate, missing_encoders
from tools.training import dataset

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "engines" / "cxr-lite0" / "manifest.yaml"
RESULT_TOPIC = "cxr/+/+/result"
TARGETS = {"e2e_p95_ms.uncompressed": 150.0, "e2e_p95_ms.j2k": 400.0, "peak_rss_mb": 400.0}


@dataclass(frozen=True)
class Plan:
    quick: bool
    sources: int  # real images each syntax is generated from
    repeats: int  # timed repeats per file (in-process stages)
    e2e: int  # files per category through the daemon
    backlog: int
    baseline_backlog: int
    startups: int
    accuracy_images: int

    @staticmethod
    def make(quick: bool, backlog: int | None) -> Plan:
        if quick:
            return Plan(True, 1, 2, 2, backlog or 8, min(backlog or 8, 8), 1, 4)
        n = backlog or 500
        return Plan(False, 4, 5, 20, n, min(n, 100), 3, 48)


# --- small helpers -------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "n": len(values),
        "median": round(float(np.median(arr)), 2),
        "p95": round(float(np.percentile(arr, 95)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
        "mean": round(float(arr.mean()), 2),
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - start) * 1000.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(manifest: Manifest, ort_config: OnnxRuntimeConfig) -> dict[str, Any]:
    cpu = "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, check=False
    )
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_features": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: package_version(name)
            for name in (
                "numpy",
                "pydicom",
                "pillow",
                "onnxruntime",
                "pylibjpeg-openjpeg",
                "python-gdcm",
                "paho-mqtt",
            )
        },
        "mosquitto": mosquitto.splitlines()[0] if mosquitto else None,
        "git_commit": commit.stdout.strip() or None,
        "model": {"name": manifest.name, "version": manifest.version, "input": manifest.input.model_dump()},
        "threads": {
            "ort_intra_op_threads": ort_config.intra_op_threads,
            "ort_inter_op_threads": ort_config.inter_op_threads,
            "ort_graph_optimization": ort_config.graph_optimization,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "baseline": "onnxruntime.InferenceSession(path) with default SessionOptions",
        },
    }


# --- inputs ----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    categories: dict[str, list[Path]]  # syntax or 'real_dicom' / 'real_image' -> files
    missing: dict[str, str]


def prepare_inputs(data: Path, work: Path, plan: Plan) -> Inputs:
    sources = frontal_sources(data, plan.sources)
    made = generate(sources, work / "cart", list(SYNTAXES))
    records = [r for r in dataset.load_records(data) if r.is_cxr and not r.is_dicom]
    images = [data / r.file for r in records[: max(plan.e2e, 3)]]
    categories: dict[str, list[Path]] = {**made}
    categories["real_dicom"] = sorted((data / "dicom").glob("*.dcm"))
    categories["real_image"] = images
    return Inputs(categories, missing_encoders())


class Restamper:
    """Copies of a DICOM under a new SOP Instance UID (the spool de-duplicates on it), by a same-length
    byte substitution in the header: no re-encoding, so making 500 backlog files takes seconds."""

    def __init__(self) -> None:
        self.counter = 0
        self.cache: dict[Path, tuple[bytes, bytes]] = {}

    def bytes_for(self, path: Path) -> bytes:
        if path not in self.cache:
            import pydicom

            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID).encode()
            self.cache[path] = (path.read_bytes(), uid)
        content, uid = self.cache[path]
        last = uid.rsplit(b".", 1)[-1]
        width = min(6, len(last) - 1)
        if width < 3:
            raise ValueError(f"{path.name}: SOP Instance UID {uid.decode()} too short to restamp")
        self.counter += 1
        new = uid[:-width] + str(self.counter % 10**width).zfill(width).encode()
        # Only header occurrences (the pixel data is far beyond the first few kB).
        head = content[:65536].replace(uid, new)
        return head + content[65536:]


def unique_copy(path: Path, restamper: Restamper) -> bytes:
    return restamper.bytes_for(path) if sniff(path) == "dicom" else path.read_bytes()


# --- baseline: the newcomer's pipeline --------------------------------------------------------------


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


# --- in-process stage timings ----------------------------------------------------------------------


def make_analyzer(
    manifest_path: Path, precision: Precision, ort_config: OnnxRuntimeConfig, work: Path
) -> Analyzer:
    manifest = load_manifest(manifest_path)
    backend = OnnxRuntimeBackend(manifest, precision, ort_config, max_batch=4)
    config = AppConfig.model_validate({"privacy": {"salt_file": str(work / "salt")}})
    analyzer = Analyzer(config, manifest, backend)
    analyzer.warm_up()
    return analyzer


def measure_stages(
    analyzer: Analyzer, inputs: Inputs, repeats: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Per category, per stage: summary over files x repeats (after one warm-up per file)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for category, paths in inputs.categories.items():
        samples: dict[str, list[float]] = {}
        for path in paths[: max(2, len(paths))]:
            for attempt in range(repeats + 1):
                job = Job(path=path, image_id="bench", source="bench")
                if sniff(path) == "dicom":
                    _, parse_ms = timed(partial(dicom_reader._parse, path))
                else:
                    parse_ms = 0.0
                results = analyzer.analyze([job])
                if results[0].status == "error":
                    raise RuntimeError(f"{path.name}: {results[0].reason}: {results[0].text}")
                if attempt == 0:
                    continue
                stages = dict(results[0].timings_ms)
                stages["read"] = parse_ms
                stages["decode"] = max(0.0, job.timer.stages.get("read", 0.0) - parse_ms)
                for name, value in stages.items():
                    samples.setdefault(name, []).append(value)
        out[category] = {name: summary(values) for name, values in samples.items()}
    return out


def measure_detection(
    work: Path, inputs: Inputs, repeats: int, restamper: Restamper
) -> dict[str, dict[str, float]]:
    """File closed -> FolderWatcher hands it over (inotify CLOSE_WRITE + the completeness check)."""
    folder = work / "detect"
    folder.mkdir()
    ready: dict[str, float] = {}
    cond = threading.Condition()

    def on_ready(path: Path, source: str) -> None:
        with cond:
            ready[path.name] = time.perf_counter()
            cond.notify_all()

    watcher = FolderWatcher([folder], on_ready, stable_seconds=2.0, poll_seconds=1.0)
    watcher.start()
    time.sleep(0.3)
    out: dict[str, dict[str, float]] = {}
    try:
        for category, paths in inputs.categories.items():
            values: list[float] = []
            for index in range(repeats + 1):
                path = paths[index % len(paths)]
                content = unique_copy(path, restamper)
                name = f"{category}-{index}{path.suffix or '.dcm'}"
                with (folder / name).open("wb") as fh:
                    fh.write(content)
                    fh.flush()
                    # Stamped just before close(): the watcher thread may run before close() returns.
                    closed = time.perf_counter()
                with cond:
                    cond.wait_for(lambda n=name: n in ready, timeout=10)  # type: ignore[misc]
                if name in ready and index > 0:
                    values.append((ready[name] - closed) * 1000.0)
                (folder / name).unlink()
            out[category] = summary(values)
    finally:
        watcher.stop()
    return out


def measure_publish(
    analyzer: Analyzer, broker: Broker, work: Path, sample: Path, repeats: int
) -> dict[str, float]:
    """One real result through the appliance's durable outbox and publisher, until the PUBACK."""
    (result,) = analyzer.analyze([Job(path=sample, image_id="publish", source="bench")])
    mqtt_config = MqttConfig(host=broker.host, port=broker.port)
    outbox = Outbox(work / "bench-outbox.sqlite3")
    publisher = MqttPublisher(mqtt_config, DeviceConfig(site="bench", device_id="cart-1"), outbox)
    publisher.start()
    values: list[float] = []
    try:
        publisher.flush(10)
        for index in range(repeats * 4 + 1):
            copy = result.model_copy(update={"message_id": f"bench-{index}-{time.time_ns()}"})
            start = time.perf_counter()
            publisher.publish_result(copy)
            if not publisher.flush(10):
                raise RuntimeError("the broker did not acknowledge within 10 s")
            if index:
                values.append((time.perf_counter() - start) * 1000.0)
    finally:
        publisher.close()
        outbox.close()
    return summary(values) | {"payload_bytes": len(result.to_json())}


def measure_precisions(
    manifest_path: Path, ort_config: OnnxRuntimeConfig, work: Path, images: list[Path], repeats: int
) -> dict[str, Any]:
    manifest = load_manifest(manifest_path)
    out: dict[str, Any] = {}
    manifest_path, unshipped = with_unshipped_precisions(manifest, work)
    manifest = load_manifest(manifest_path)
    shipped = [p for p in Precision if p in manifest.onnx]
    reference: list[dict[str, float]] | None = None
    reference_triage: list[str | None] = []
    for precision in shipped:
        timing = infer_timing_isolated(manifest_path, precision, ort_config, repeats)
        analyzer = make_analyzer(manifest_path, precision, ort_config, work)
        entry: dict[str, Any] = {f"infer_ms_per_image_{k}": v for k, v in timing.items()}
        results = analyzer.analyze(
            [Job(path=p, image_id=f"acc{i}", source="bench") for i, p in enumerate(images)]
        )
        scores = [{f.label: f.score for f in r.findings} for r in results]
        if reference is None:
            reference, reference_triage = scores, [r.triage for r in results]
        else:
            deltas = [
                abs(s[k] - ref[k]) for s, ref in zip(scores, reference, strict=True) for k in ref if k in s
            ]
            agree = [r.triage == t for r, t in zip(results, reference_triage, strict=True)]
            entry["vs_fp32"] = {
                "images": len(images),
                "score_abs_delta_mean": round(float(np.mean(deltas)), 5) if deltas else None,
                "score_abs_delta_max": round(float(np.max(deltas)), 5) if deltas else None,
                "triage_agreement": round(float(np.mean(agree)), 4) if agree else None,
            }
        analyzer.backend.close()
        if precision in unshipped:
            entry["shipped"] = False
            entry["note"] = unshipped[precision]
        out[precision.value] = entry
    if Precision.int8 in shipped and ort_config.int8_cpu_lowering:
        # The backend runs INT8 lowered for the CPU (appliance.backends.ort_lowering); the file as
        # TensorRT reads it, unlowered, is timed for comparison.
        unlowered = ort_config.model_copy(update={"int8_cpu_lowering": False})
        timing = infer_timing_isolated(manifest_path, Precision.int8, unlowered, repeats)
        out["int8 (TensorRT form, not lowered)"] = {f"infer_ms_per_image_{k}": v for k, v in timing.items()}
    for batch in (1, 4):
        fp32 = out.get("fp32", {}).get(f"infer_ms_per_image_batch{batch}", {}).get("median")
        for entry in out.values():
            mine = entry[f"infer_ms_per_image_batch{batch}"].get("median")
            if fp32 and mine:
                entry[f"speedup_vs_fp32_batch{batch}"] = round(fp32 / mine, 3)
    missing = [p.value for p in (Precision.fp16, Precision.int8) if p not in shipped]
    if missing:
        out["not_shipped"] = missing
    try:
        import tensorrt  # noqa: F401

        out["tensorrt"] = "importable; run tools/engines/build_engine.py on a GPU cart and bench there"
    except ImportError:
        out["tensorrt"] = "skipped: tensorrt is not installed (CPU-only machine)"
    return out


def with_unshipped_precisions(manifest: Manifest, work: Path) -> tuple[Path, dict[Precision, str]]:
    """A manifest copy (in `work`) that also lists model.fp16.onnx / model.int8.onnx when they sit next to
    the model but the manifest leaves them out (their parity gate failed): measured, marked unshipped."""
    import yaml

    from appliance.manifest import sha256_file

    source = manifest.folder / "manifest.yaml"
    doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    unshipped: dict[Precision, str] = {}
    for precision, name in ((Precision.fp16, "model.fp16.onnx"), (Precision.int8, "model.int8.onnx")):
        path = manifest.folder / name
        if precision not in manifest.onnx and path.is_file():
            doc["onnx"][precision.value] = {"file": str(path.resolve()), "sha256": sha256_file(path)}
            report = manifest.folder / f"parity_{precision.value}.md"
            unshipped[precision] = "not in the manifest" + (
                f" (parity gate: {report.read_text(encoding='utf-8').splitlines()[0].lstrip('# ')})"
                if report.is_file()
                else ""
            )
    if not unshipped:
        return source, unshipped
    folder = work / "precisions"
    folder.mkdir(exist_ok=True)
    for precision, entry in manifest.onnx.items():
        doc["onnx"][precision.value]["file"] = str((manifest.folder / entry.file).resolve())
    copy = folder / "manifest.yaml"
    copy.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return copy, unshipped


def measure_reading_parity(manifest_path: Path, work: Path, inputs: Inputs) -> dict[str, Any]:
    """The fast reading (reduced resolution, integer block means) against full-resolution reading,
    through the same model: how far the scores move and whether the decisions agree."""
    fast = make_analyzer(manifest_path, Precision.fp32, OnnxRuntimeConfig(), work)
    full = Analyzer(fast.config, fast.manifest, fast.backend)
    full.target_size = 0  # 0: no reduction anywhere, every decoder at full size
    out: dict[str, Any] = {}
    for category, paths in inputs.categories.items():
        if category == "real_image":
            continue
        jobs = [Job(path=p, image_id=f"p{i}", source="bench") for i, p in enumerate(paths)]
        quick = fast.analyze(jobs)
        slow = full.analyze([Job(path=p, image_id=f"p{i}", source="bench") for i, p in enumerate(paths)])
        deltas = [
            abs(f.score - g.score)
            for a, b in zip(quick, slow, strict=True)
            for f, g in zip(a.findings, b.findings, strict=True)
        ]
        out[category] = {
            "images": len(paths),
            "score_abs_delta_max": round(max(deltas), 5) if deltas else None,
            "triage_agreement": round(
                float(np.mean([a.triage == b.triage for a, b in zip(quick, slow, strict=True)])), 3
            ),
            "status_agreement": round(
                float(np.mean([a.status == b.status for a, b in zip(quick, slow, strict=True)])), 3
            ),
        }
    fast.backend.close()
    return out


def infer_timing(
    manifest_path: Path, precision: Precision, config: OnnxRuntimeConfig, repeats: int
) -> dict[str, Any]:
    """ms per image at batch 1 and 4 (zeros: the time does not depend on the pixels)."""
    manifest = load_manifest(manifest_path)
    spec = manifest.input
    shape = (
        (spec.height, spec.width, spec.channels)
        if spec.layout == "NHWC"
        else (spec.channels, spec.height, spec.width)
    )
    backend = OnnxRuntimeBackend(manifest, precision, config)
    out: dict[str, Any] = {}
    for batch in (1, 4):
        tensor = np.zeros((batch, *shape), dtype=backend.input_dtype)
        backend.run(tensor)
        out[f"batch{batch}"] = summary(
            [timed(partial(backend.run, tensor))[1] / batch for _ in range(repeats * 4)]
        )
    backend.close()
    return out


def infer_timing_isolated(
    manifest_path: Path, precision: Precision, config: OnnxRuntimeConfig, repeats: int
) -> dict[str, Any]:
    """infer_timing in a fresh process: the spinning worker threads of other ONNX Runtime sessions in
    this one would compete for the cores and make 2-thread figures look 4x worse than they are."""
    probe = json.dumps(
        {
            "model": str(manifest_path),
            "precision": precision.value,
            "ort": config.model_dump(),
            "repeats": repeats,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tools.quality.bench", "--probe", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def measure_ort_sweep(manifest_path: Path, repeats: int) -> dict[str, Any]:
    """Thread counts and graph optimisation levels, FP32: the evidence for the defaults."""
    out: dict[str, Any] = {}
    for threads in (1, 2):
        for level in ("extended", "all"):
            config = OnnxRuntimeConfig(intra_op_threads=threads, graph_optimization=level)
            timing = infer_timing_isolated(manifest_path, Precision.fp32, config, repeats)
            out[f"intra{threads}_{level}"] = {f"{k}_ms_per_image": v.get("median") for k, v in timing.items()}
    return out


# --- the real daemon ---------------------------------------------------------------------------------


def rss_peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


class DaemonRun:
    """The daemon, a broker, a subscriber on the result topic."""

    def __init__(self, work: Path, broker: Broker, model: Path, ort: OnnxRuntimeConfig) -> None:
        inference = {"precision": "fp32", "onnxruntime": ort.model_dump()}
        self.daemon = DaemonProcess(work, broker, model, inference=inference, logging={"level": "WARNING"})
        self.subscriber = Subscriber(broker, RESULT_TOPIC, clean_session=True)
        self.startup_ms = 0.0

    def start(self) -> DaemonRun:
        started = time.time()
        self.daemon.start(timeout=120)
        self.startup_ms = (time.time() - started) * 1000.0
        return self

    def count(self) -> int:
        return len(self.subscriber.on_topic(RESULT_TOPIC))

    def drop(self, name: str, content: bytes) -> float:
        """Write and close a file in the inbox; returns the wall-clock time of the close."""
        with (self.daemon.inbox / name).open("wb") as fh:
            fh.write(content)
            fh.flush()
            closed = time.time()  # before close(): the daemon may answer before close() returns here
        return closed

    def wait(self, count: int, timeout: float) -> list[Any]:
        return self.subscriber.wait_count(RESULT_TOPIC, count, timeout)

    def stop(self) -> None:
        self.subscriber.close()
        self.daemon.stop()


def measure_e2e(run: DaemonRun, inputs: Inputs, per_category: int, restamper: Restamper) -> dict[str, Any]:
    latencies: dict[str, Any] = {}
    stage_samples: dict[str, dict[str, list[float]]] = {}
    statuses: dict[str, dict[str, int]] = {}  # an error result is fast: the figures only count if "ok"
    # Warm-up: the first images after start pay for lazy imports in the decoders.
    for path in [paths[0] for category, paths in inputs.categories.items() if category != "real_image"]:
        expected = run.count() + 1
        run.drop(f"warm-{restamper.counter}{path.suffix or '.dcm'}", unique_copy(path, restamper))
        run.wait(expected, 60)
    for category, paths in inputs.categories.items():
        values: list[float] = []
        count = per_category if category != "real_dicom" else max(per_category, len(paths))
        for index in range(count):
            path = paths[index % len(paths)]
            content = unique_copy(path, restamper) if category != "real_image" else path.read_bytes()
            if category == "real_image" and index >= len(paths):
                break  # distinct files only: the spool would recognise a repeat
            expected = run.count() + 1
            closed = run.drop(f"{category}-{index}-{restamper.counter}{path.suffix or '.dcm'}", content)
            messages = run.wait(expected, 60)
            if len(messages) < expected:
                raise RuntimeError(
                    f"{category}: no result within 60 s; daemon log:\n{run.daemon.log()[-3000:]}"
                )
            received = messages[expected - 1]
            values.append((received.at - closed) * 1000.0)
            body = received.json()
            statuses.setdefault(category, {}).setdefault(body.get("status", "?"), 0)
            statuses[category][body.get("status", "?")] += 1
            timings = body.get("timings_ms", {})
            for name, value in timings.items():
                stage_samples.setdefault(category, {}).setdefault(name, []).append(float(value))
        latencies[category] = summary(values)
    return {
        "latency_ms": latencies,
        "statuses": statuses,
        "daemon_stages_ms": {
            cat: {name: summary(vals)["median"] for name, vals in stages.items()}
            for cat, stages in stage_samples.items()
        },
    }


def backlog_files(inputs: Inputs, n: int) -> list[Path]:
    """The backlog mix: cart DICOMs of every syntax, round robin."""
    pools = [inputs.categories[s] for s in SYNTAXES if s in inputs.categories]
    return [pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])] for i in range(n)]


def measure_backlog(run: DaemonRun, files: list[Path], work: Path, restamper: Restamper) -> dict[str, Any]:
    stage = run.daemon.workdir / "stage"  # same file system as the inbox: a rename is atomic
    stage.mkdir()
    staged = []
    for index, path in enumerate(files):
        target = stage / f"backlog-{index:04d}.dcm"
        target.write_bytes(unique_copy(path, restamper))
        staged.append(target)
    expected = run.count() + len(staged)
    started = time.time()
    for path in staged:
        os.rename(path, run.daemon.inbox / path.name)
    messages = run.wait(expected, 60 + 5.0 * len(staged))
    done = len(messages) - (expected - len(staged))
    elapsed = (messages[-1].at - started) if messages else float("nan")
    return {
        "files": len(staged),
        "results": done,
        "seconds": round(elapsed, 2),
        "images_per_s": round(done / elapsed, 3) if elapsed > 0 else None,
    }


# --- baseline measurements ------------------------------------------------------------------------------


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


# --- report --------------------------------------------------------------------------------------------


def ratio(baseline: float | None, ours: float | None, higher_is_better: bool = False) -> float | None:
    if not baseline or not ours:
        return None
    return round((ours / baseline) if higher_is_better else (baseline / ours), 2)


def assemble(raw: dict[str, Any]) -> dict[str, Any]:
    e2e = raw["e2e"]["latency_ms"]
    base = raw["baseline"]
    out: dict[str, Any] = {
        "e2e_p95_ms": {c: s.get("p95") for c, s in e2e.items()},
        "e2e_p99_ms": {c: s.get("p99") for c, s in e2e.items()},
        "e2e_median_ms": {c: s.get("median") for c, s in e2e.items()},
        "throughput_images_per_s": raw["backlog"]["images_per_s"],
        "peak_rss_mb": raw["peak_rss_mb"],
        "startup_to_ready_ms": raw["startup_to_ready_ms"],
        "stages_ms": raw["stages_ms"],
        "baseline": {
            "e2e_p95_ms": {c: s.get("p95") for c, s in base["e2e_ms"].items()},
            "e2e_median_ms": {c: s.get("median") for c, s in base["e2e_ms"].items()},
            "throughput_images_per_s": base["backlog"]["images_per_s"],
            "stages_ms": base["stages_ms"],
            "backlog": base["backlog"],
        },
    }
    out["throughput_ratio_vs_baseline"] = ratio(
        out["baseline"]["throughput_images_per_s"], out["throughput_images_per_s"], higher_is_better=True
    )
    out["e2e_p95_speedup_vs_baseline"] = {
        c: ratio(out["baseline"]["e2e_p95_ms"].get(c), v) for c, v in out["e2e_p95_ms"].items()
    }
    out["targets"] = {
        "e2e_p95_ms.uncompressed <= 150": _met(out["e2e_p95_ms"].get("uncompressed"), 150.0),
        "e2e_p95_ms.j2k <= 400": _met(out["e2e_p95_ms"].get("j2k"), 400.0),
        "throughput_ratio_vs_baseline >= 3": (out["throughput_ratio_vs_baseline"] or 0) >= 3.0,
        "peak_rss_mb <= 400": _met(out["peak_rss_mb"], 400.0),
    }
    out["architecture_v2"] = architecture_v2(out)
    return out | {k: v for k, v in raw.items() if k not in ("baseline",)} | {"baseline_detail": base}


def architecture_v2(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The "Architecture v2" issue's targets, as ratios from this one run: the time spent between the
    stages (end to end over the in-process stage sum), backlog and JPEG-lossless speed against the naive
    baseline, peak memory and start-up."""
    stages = out["stages_ms"].get("uncompressed", {})
    stage_sum = sum(v for v in stages.values() if isinstance(v, (int, float))) or None
    figures: dict[str, tuple[float | None, str, bool | None]] = {}

    def over(value: float | None, base: float | None) -> float | None:
        return round(value / base, 2) if value is not None and base else None

    median_ratio = over(out["e2e_median_ms"].get("uncompressed"), stage_sum)
    p95_ratio = over(out["e2e_p95_ms"].get("uncompressed"), stage_sum)
    lossless = ratio(
        out["baseline"]["e2e_median_ms"].get("jpeg_lossless"), out["e2e_median_ms"].get("jpeg_lossless")
    )
    figures["e2e median / stage sum, uncompressed"] = (median_ratio, "<= 1.25", _met(median_ratio, 1.25))
    figures["e2e p95 / stage sum, uncompressed"] = (p95_ratio, "<= 1.5", _met(p95_ratio, 1.5))
    backlog = out["throughput_ratio_vs_baseline"]
    figures["backlog vs baseline"] = (backlog, ">= 5", None if backlog is None else backlog >= 5.0)
    figures["jpeg_lossless e2e median vs baseline"] = (
        lossless,
        ">= 4",
        None if lossless is None else lossless >= 4.0,
    )
    figures["peak RSS MB (daemon)"] = (out["peak_rss_mb"], "<= 300", _met(out["peak_rss_mb"], 300.0))
    startup = out["startup_to_ready_ms"].get("median")
    figures["start-up to READY s"] = (
        None if startup is None else round(startup / 1000, 2),
        "<= 1.5",
        None if startup is None else startup <= 1500.0,
    )
    return {name: {"value": v, "target": t, "met": m} for name, (v, t, m) in figures.items()}


def _met(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Benchmark ({'quick' if report['quick'] else 'full'}) — {env['cpu_model']}, {env['cpu_affinity']} CPU(s)",
        "",
        f"Command: `{report['command']}`  ",
        f"onnxruntime {env['versions']['onnxruntime']}, model {env['model']['name']} {env['model']['version']}, "
        f"ORT intra-op threads {env['threads']['ort_intra_op_threads']} (0 = all cores but one), "
        f"graph optimisation {env['threads']['ort_graph_optimization']}.",
        "",
        "| figure | ours | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    targets = {
        "uncompressed": ("<= 150 ms", "e2e_p95_ms.uncompressed <= 150"),
        "j2k": ("<= 400 ms", "e2e_p95_ms.j2k <= 400"),
    }
    for category, value in report["e2e_p95_ms"].items():
        base = report["baseline"]["e2e_p95_ms"].get(category)
        target, key = targets.get(category, ("", ""))
        met = report["targets"].get(key) if key else None
        lines.append(
            f"| e2e p95 ms, {category} | {value} | {base} | {ratio(base, value)}x | {target} | {_yes(met)} |"
        )
    lines.append(
        f"| backlog images/s ({report['backlog']['files']} files) | {report['throughput_images_per_s']} | "
        f"{report['baseline']['throughput_images_per_s']} | {report['throughput_ratio_vs_baseline']}x | >= 3x | "
        f"{_yes(report['targets']['throughput_ratio_vs_baseline >= 3'])} |"
    )
    lines.append(
        f"| peak RSS MB (daemon) | {report['peak_rss_mb']} | | | <= 400 | {_yes(report['targets']['peak_rss_mb <= 400'])} |"
    )
    lines.append(f"| start-up to READY ms | {report['startup_to_ready_ms'].get('median')} | | | | |")
    lines += [
        "",
        "Architecture v2 targets (ratios from this run):",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for name, figure in report.get("architecture_v2", {}).items():
        lines.append(f"| {name} | {figure['value']} | {figure['target']} | {_yes(figure['met'])} |")
    lines += ["", "Per-stage medians (ms, in process; read = header parse, decode = pixels to float):", ""]
    stage_names = ["detect", "read", "decode", "preprocess", "infer", "interpret", "publish"]
    lines.append("| input | " + " | ".join(stage_names) + " |")
    lines.append("|---|" + "---|" * len(stage_names))
    for category, stages in report["stages_ms"].items():
        lines.append(f"| {category} | " + " | ".join(str(stages.get(s, "")) for s in stage_names) + " |")
    base = report["baseline"]["stages_ms"]
    lines.append(
        "| baseline (all inputs) | | | "
        + " | ".join(str(round(base.get(s, 0), 2)) for s in ("decode", "preprocess", "infer"))
        + f" | | {round(base.get('publish', 0), 2)} |"
    )
    lines += ["", "Precisions (ONNX Runtime CPU, ms per image, median):", ""]
    lines.append(
        "| precision | batch 1 | batch 4 | speed-up vs fp32 (batch 1 / 4) | mean abs score delta"
        " | triage agreement |"
    )
    lines.append("|---|---|---|---|---|---|")
    for name, entry in report["precisions"].items():
        if not isinstance(entry, dict):
            continue
        vs = entry.get("vs_fp32", {})
        lines.append(
            f"| {name} | {entry['infer_ms_per_image_batch1'].get('median')} | "
            f"{entry['infer_ms_per_image_batch4'].get('median')} | {entry.get('speedup_vs_fp32_batch1')} / "
            f"{entry.get('speedup_vs_fp32_batch4')} | "
            f"{vs.get('score_abs_delta_mean', '')} | {vs.get('triage_agreement', '')} |"
        )
    lines.append(f"\nTensorRT: {report['precisions'].get('tensorrt')}")
    lines += ["", "Fast reading vs full-resolution reading, same model (fp32):", ""]
    lines.append("| input | images | max abs score delta | triage agreement |")
    lines.append("|---|---|---|---|")
    for category, entry in report.get("reading_parity", {}).items():
        lines.append(
            f"| {category} | {entry['images']} | {entry['score_abs_delta_max']} | {entry['triage_agreement']} |"
        )
    if report["missing_encoders"]:
        lines.append(f"\nNot generated: {report['missing_encoders']}")
    return "\n".join(lines) + "\n"


def _yes(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "NO")


# --- main ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.make(args.quick, args.backlog)
    data = dataset.data_dir(args.data)
    manifest_path = Path(args.model).resolve()  # the daemon resolves relative paths against its config
    manifest = load_manifest(manifest_path)
    ort_config = OnnxRuntimeConfig(intra_op_threads=args.intra_op_threads)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-", dir=args.workdir))
    restamper = Restamper()
    raw: dict[str, Any] = {
        "quick": plan.quick,
        "plan": plan.__dict__,
        "command": " ".join(["python", *sys.argv]),
    }
    raw["environment"] = environment(manifest, ort_config)
    try:
        log(f"generating cart DICOMs from {plan.sources} real image(s) in {work}")
        inputs = prepare_inputs(data, work, plan)
        raw["missing_encoders"] = inputs.missing
        raw["inputs"] = {c: [p.name for p in ps] for c, ps in inputs.categories.items()}
        broker = Broker(work / "broker", persistence=False).start()
        try:
            analyzer = make_analyzer(manifest_path, Precision.fp32, ort_config, work)
            log("stages in process")
            stages = measure_stages(analyzer, inputs, plan.repeats)
            detect = measure_detection(work, inputs, plan.repeats, restamper)
            publish = measure_publish(
                analyzer, broker, work, inputs.categories["uncompressed"][0], plan.repeats
            )
            raw["stages_detail"] = stages
            raw["stages_ms"] = {
                category: {name: s["median"] for name, s in per_stage.items() if name != "journal"}
                | {"detect": detect.get(category, {}).get("median"), "publish": publish["median"]}
                for category, per_stage in stages.items()
            }
            raw["detect_ms"], raw["publish_ms"] = detect, publish
            analyzer.backend.close()
            log("fast reading vs full-resolution reading")
            raw["reading_parity"] = measure_reading_parity(manifest_path, work, inputs)
            log("precisions")
            accuracy = [data / r.file for r in dataset.load_records(data) if r.is_cxr and not r.is_dicom]
            raw["precisions"] = measure_precisions(
                manifest_path, ort_config, work, accuracy[: plan.accuracy_images], plan.repeats
            )
            if not plan.quick:
                log("ONNX Runtime thread / optimisation sweep")
                raw["ort_sweep"] = measure_ort_sweep(manifest_path, plan.repeats)
            log("daemon start-up")
            startups = []
            for index in range(plan.startups):
                probe = DaemonRun(work / f"startup{index}", broker, manifest_path, ort_config).start()
                startups.append(probe.startup_ms)
                probe.stop()
            raw["startup_to_ready_ms"] = summary(startups)
            log("daemon end to end")
            daemon = DaemonRun(work / "daemon", broker, manifest_path, ort_config).start()
            try:
                raw["e2e"] = measure_e2e(daemon, inputs, plan.e2e, restamper)
                log(f"daemon backlog of {plan.backlog}")
                backlog = backlog_files(inputs, plan.backlog)
                raw["backlog"] = measure_backlog(daemon, backlog, work, restamper)
                assert daemon.daemon.proc is not None
                raw["peak_rss_mb"] = rss_peak_mb(daemon.daemon.proc.pid)
            finally:
                daemon.stop()
            log("baseline")
            baseline = Baseline(manifest, broker)
            try:
                stride = max(1, len(backlog) // plan.baseline_backlog)
                raw["baseline"] = measure_baseline(
                    baseline, inputs, plan.e2e, backlog[::stride][: plan.baseline_backlog]
                )
            finally:
                baseline.close()
        finally:
            broker.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    return assemble(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a handful of files (CI smoke; no targets asserted)"
    )
    parser.add_argument("--json", type=Path, help="output JSON (and OUT.md next to it)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: infer_timing_isolated's child
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model manifest (default: the bundled one)"
    )
    parser.add_argument("--data", help="CXR data folder (default: $CXR_DATA or ../shared/data/cxr)")
    parser.add_argument("--backlog", type=int, help="backlog size (default 500; quick 8)")
    parser.add_argument("--workdir", help="where the temporary files go (default: the system temp dir)")
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads (0 = the default config's choice)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated files and daemon logs")
    args = parser.parse_args(argv)
    if args.probe:
        probe = json.loads(args.probe)
        config = OnnxRuntimeConfig.model_validate(probe["ort"])
        print(
            json.dumps(
                infer_timing(Path(probe["model"]), Precision(probe["precision"]), config, probe["repeats"])
            )
        )
        return 0
    if args.json is None:
        parser.error("--json OUT is required")
    if not Path(args.model).exists():
        print(
            f"bench: {args.model}: no such model manifest (train/export it, or pass --model)", file=sys.stderr
        )
        return 2
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("bench: mosquitto not found (apt-get install mosquitto)", file=sys.stderr)
        return 2
    report = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md = args.json.with_name(args.json.name + ".md")
    md.write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
