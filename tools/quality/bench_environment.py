"""What the bench ran on (tools/quality/bench.py): CPU model and features, package versions, Mosquitto,
the git commit, the model and the ONNX Runtime thread settings, recorded in every report."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from appliance.backends.onnxruntime import OnnxRuntimeConfig
from appliance.manifest import Manifest
from tools.training.dataset import REPO


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
