"""The real daemon under the bench (tools/quality/bench.py): `cxr-appliance run` as a child with a real
Mosquitto and a subscriber on the result topic; end-to-end latency from the closed file to the received
result, a backlog renamed into the inbox at once, peak RSS and start-up time."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from appliance.backends.onnxruntime import OnnxRuntimeConfig
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Subscriber
from tools.quality.bench_inputs import Inputs, Restamper, unique_copy
from tools.quality.bench_timing import summary

RESULT_TOPIC = "cxr/+/+/result"


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

    def peak_rss_mb(self) -> float | None:
        kb = self.daemon.peak_rss_kb()
        return None if kb is None else round(kb / 1024.0, 1)

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
