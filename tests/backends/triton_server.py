"""A REAL Triton Inference Server on loopback for the triton backend's tests, where one can be found.

Where: $TRITONSERVER_BIN, `tritonserver` on PATH, or the server bundled in the nvidia-pytriton
wheel (Apache-2.0; `pip install --no-deps nvidia-pytriton`: only its binary is used, never its
Python API). That bundle carries Triton's Python backend only, not ONNX Runtime or TensorRT, so
`python_backend_repository` turns a repository written by tools/engines/export_triton.py into one whose
models run the SAME exported model.onnx with ONNX Runtime inside Triton's Python backend. Only
`backend`, `platform` and `default_model_filename` change: inputs, outputs, dims, batching,
instance groups and the provenance parameters are the exported ones, loaded by the real server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

MODEL_PY = '''\
"""Runs the exported model.onnx with ONNX Runtime (test stand-in for Triton's onnxruntime backend)."""
import json
import os
import sys

sys.path[:0] = SITE_PACKAGES  # the stub's embedded Python ignores PYTHONPATH

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            # DLPack, not as_numpy()/Tensor(): the bundled stub's numpy path silently passes zeros
            # under numpy 2 (seen with Triton 2.51); DLPack is ABI-independent.
            batch = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input))
            values = self.session.run(self.outputs, {self.input: batch})
            tensors = [
                pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
'''


def _bundled() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.is_file() else None


def find_tritonserver() -> tuple[Path | None, str]:
    """(binary, '') or (None, why not)."""
    given = os.environ.get("TRITONSERVER_BIN")
    if given:
        return (
            (Path(given), "")
            if os.access(given, os.X_OK)
            else (None, f"TRITONSERVER_BIN={given} not executable")
        )
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), ""
    bundled = _bundled()
    if bundled is None:
        return None, "no tritonserver binary (pip install --no-deps nvidia-pytriton, or set TRITONSERVER_BIN)"
    stub = bundled.parent.parent / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not (stub / "triton_python_backend_stub").is_file():
        return None, f"nvidia-pytriton has no Python backend stub for Python {sys.version_info[:2]}"
    return bundled, ""


def python_backend_repository(exported: Path, target: Path) -> Path:
    """Copy an exported repository, each model switched to the Python backend running its model.onnx."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(exported, target)
    site = [p for p in sys.path if p.endswith("site-packages")]
    for config_path in target.glob("*/config.pbtxt"):
        config = text_format.Parse(config_path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        assert config.platform == "onnxruntime_onnx", f"{config_path}: only ONNX exports run here"
        config.ClearField("platform")
        config.backend = "python"
        config.default_model_filename = "model.py"
        config_path.write_text(text_format.MessageToString(config), encoding="utf-8")
        for version in (p for p in config_path.parent.iterdir() if p.name.isdigit()):
            (version / "model.py").write_text(MODEL_PY.replace("SITE_PACKAGES", repr(site)), encoding="utf-8")
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonServer:
    """tritonserver on 127.0.0.1 (HTTP + gRPC, metrics off); stopped with SIGTERM, then SIGKILL."""

    def __init__(self, binary: Path, repository: Path, workdir: Path) -> None:
        self.binary, self.repository, self.workdir = binary, repository, workdir
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _environment(self) -> tuple[dict[str, str], list[str]]:
        env = dict(os.environ)
        args: list[str] = []
        if self.binary == _bundled():
            # The wheel's stub must sit in the backend folder; its libraries lie in nvidia_pytriton.libs,
            # and the stub embeds this interpreter's libpython with this venv's site-packages.
            root = self.binary.parent.parent
            backends = self.workdir / "backends"
            python = backends / "python"
            shutil.copytree(root / "backends" / "python", python)
            stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
            shutil.copy2(stub / "triton_python_backend_stub", python / "triton_python_backend_stub")
            libs = [str(root.parent.parent / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR"))]
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
            args += [f"--backend-directory={backends}"]
        return env, args

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        env, extra = self._environment()
        command = [
            str(self.binary),
            f"--model-repository={self.repository}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
            *extra,
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
