"""The triton backend: pure parts on their own, then against a REAL tritonserver.

Pure parts (request building, output mapping, batch splitting, provenance and metadata checks,
error messages) run tritonclient's own classes; the metadata dicts fed to `metadata_problems` are
hand-made and stand in for nothing: the served-model tests below check the same code against what
a real server answers.

Server tests: (1) a local tritonserver (tests/backends/triton_server.py: the binary bundled in
nvidia-pytriton, Python backend running the exported model.onnx with ONNX Runtime), skipped when
no binary is found; (2) an external server with the exported cxr-lite0 at $TRITON_URL (e.g. a GPU
server running Triton's onnxruntime or tensorrt_plan backend), skipped otherwise.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from appliance.backends.select import TritonUnavailable, create_backend
from appliance.backends.triton import (
    TritonBackend,
    TritonBackendConfig,
    TritonConfig,
    build_inputs,
    collect_outputs,
    import_client,
    metadata_problems,
    normalise_config,
    normalise_metadata,
    served_provenance,
    split_batch,
)
from appliance.config import InferenceConfig
from appliance.errors import BackendUnavailable, UserError
from appliance.ingest import read_image
from appliance.manifest import Manifest, Precision, load_manifest
from appliance.preprocess import preprocess
from tests.backends import tiny_conv
from tests.backends.triton_server import TritonServer, find_tritonserver, python_backend_repository
from testsupport.data import cxr_data, rows
from tools.engines import export_triton

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "engines" / "cxr-lite0" / "manifest.yaml"
TRITONSERVER, NO_TRITONSERVER = find_tritonserver()


@pytest.fixture(scope="module")
def bundled() -> Manifest:
    return load_manifest(BUNDLED)


def real_batch(manifest: Manifest, count: int) -> np.ndarray:
    """`count` real chest X-rays through the appliance's own preprocessing."""
    files = [row["file"] for row in rows(modality="X-ray")][:count]
    size = max(manifest.input.height, manifest.input.width)
    samples = [
        preprocess(read_image(cxr_data() / f, target_size=size).pixels, manifest.input)[0] for f in files
    ]
    return np.stack(samples)


# --------------------------------------------------------------------------- pure parts


def test_config_validation() -> None:
    assert TritonConfig().url == "localhost:8000"
    for bad, message in [
        ({"url": "http://triton:8000"}, "without a scheme"),
        ({"url": ":8000"}, "give host:port"),
        ({"ssl": True, "cert_file": "c.pem"}, "cert_file and key_file together"),
        ({"ca_file": "ca.pem"}, "need ssl: true"),
        ({"ssl": True, "insecure_skip_verify": True, "protocol": "grpc"}, "protocol http only"),
        ({"protocol": "rest"}, "'http' or 'grpc'"),
        ({"timeout": 3}, "Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValidationError, match=message):
            TritonConfig.model_validate(bad)
    inference = InferenceConfig.model_validate(
        {"backend": "triton", "triton": {"url": "t:8001", "protocol": "grpc"}}
    )
    assert isinstance(inference.backend, TritonConfig)  # the older shape moves into inference.backend
    assert (inference.backend.type, inference.backend.protocol) == ("triton", "grpc")
    mapping = InferenceConfig.model_validate(
        {"backend": {"type": "triton", "url": "t:8001", "protocol": "grpc"}}
    )
    assert mapping == inference


def test_split_batch_keeps_order_and_bounds() -> None:
    batch = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    chunks = split_batch(batch, 2)
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), batch)
    assert [c.shape[0] for c in split_batch(batch, 8)] == [5]
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        split_batch(batch, 0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_build_inputs_carry_the_batch(protocol: str) -> None:
    client = import_client(protocol)
    chunk = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    (tensor,) = build_inputs(client, "image", chunk)
    assert (tensor.name(), tensor.shape(), tensor.datatype()) == ("image", [3, 1, 8, 8], "FP32")
    # What goes on the wire: HTTP's binary section / gRPC's raw contents, bytes of the batch itself.
    sent = tensor._get_binary_data() if protocol == "http" else tensor._get_content()
    assert sent == chunk.tobytes()
    with pytest.raises(ValueError, match="float32 or float16 only"):
        build_inputs(client, "image", chunk.astype(np.float64))


def _http_result(outputs: dict[str, np.ndarray]) -> object:
    """A real tritonclient HTTP InferResult parsed from a v2-protocol JSON response body."""
    import json

    body = {
        "model_name": "m",
        "outputs": [
            {"name": n, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
            for n, v in outputs.items()
        ],
    }
    return http.InferResult.from_response_body(json.dumps(body).encode("utf-8"))


def test_collect_outputs_by_name() -> None:
    values = {"b": np.ones((2, 3), np.float32), "a": np.arange(2, dtype=np.float32).reshape(2, 1)}
    result = _http_result(values)
    got = collect_outputs(result, ["a", "b"], 2)
    assert list(got) == ["a", "b"]
    np.testing.assert_array_equal(got["a"], values["a"])
    assert got["b"].dtype == np.float32
    with pytest.raises(ValueError, match="response lacks output 'c'"):
        collect_outputs(result, ["a", "c"], 2)
    with pytest.raises(ValueError, match=r"output 'a' has shape \(2, 1\) for a batch of 3"):
        collect_outputs(result, ["a"], 3)


def _metadata(manifest: Manifest, **change: object) -> dict[str, Any]:
    raw = {
        "name": manifest.name,
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": manifest.input.name, "datatype": "FP32", "shape": ["-1", "1", "256", "256"]}],
        "outputs": [{"name": o.name, "datatype": "FP32", "shape": ["-1", "3"]} for o in manifest.outputs],
    }
    return normalise_metadata({**raw, **change})


def test_metadata_problems(bundled: Manifest) -> None:
    metadata = _metadata(bundled)
    assert metadata["inputs"][0]["shape"] == [-1, 1, 256, 256]  # gRPC's JSON int64 strings
    assert metadata_problems(bundled, metadata, 8) == []
    wrong = _metadata(bundled, inputs=[{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}])
    assert metadata_problems(bundled, wrong, 8) == [
        "input 'image' has shape [3, 224, 224] per image, the manifest says [1, 256, 256]"
    ]
    renamed = _metadata(bundled, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 1, 256, 256]}])
    assert "inputs ['x'], the manifest expects exactly ['image']" in metadata_problems(bundled, renamed, 8)
    fp16 = _metadata(bundled, inputs=[{"name": "image", "datatype": "FP16", "shape": [-1, 1, 256, 256]}])
    assert metadata_problems(bundled, fp16, 8) == ["input 'image' is FP16, the manifest says FP32"]
    fewer = _metadata(bundled, outputs=[{"name": "view_logits", "datatype": "FP32", "shape": [-1, 3]}])
    (problem,) = metadata_problems(bundled, fewer, 8)
    assert problem.startswith("lacks outputs named in the manifest: ['finding_logits'")
    assert any("max_batch_size is 0" in p for p in metadata_problems(bundled, metadata, 0))


def test_served_provenance(bundled: Manifest) -> None:
    sha = bundled.onnx[Precision.fp32].sha256
    exported = {"model_sha256": sha, "precision": "fp32", "onnx_precision": "fp32"}
    grpc_style = normalise_config(
        {
            "config": {
                "max_batch_size": "8",
                "parameters": {k: {"string_value": v} for k, v in exported.items()},
            }
        }
    )
    assert grpc_style["max_batch_size"] == 8
    assert served_provenance(bundled, grpc_style["parameters"]) == ("fp32", sha)
    plan = {**exported, "precision": "fp16"}
    assert served_provenance(bundled, plan) == ("fp16", sha)
    with pytest.raises(BackendUnavailable, match=r"not written by tools/engines/export_triton\.py"):
        served_provenance(bundled, {})
    fp32_only = bundled.model_copy(update={"onnx": {Precision.fp32: bundled.onnx[Precision.fp32]}})
    with pytest.raises(
        BackendUnavailable, match="exported from the int8 ONNX, which manifest cxr-lite0 does not list"
    ):
        served_provenance(fp32_only, {**exported, "onnx_precision": "int8"})
    with pytest.raises(
        BackendUnavailable, match=f"lists {sha[:12]}… for fp32: the server runs another model"
    ):
        served_provenance(bundled, {**exported, "model_sha256": "0" * 64})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: connections are refused


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_no_server_is_a_plain_error_naming_the_url(bundled: Manifest, protocol: str) -> None:
    url = f"127.0.0.1:{_closed_port()}"
    inference = InferenceConfig(
        model=BUNDLED, backend=TritonBackendConfig(url=url, protocol=protocol, timeout_s=5)
    )
    with pytest.raises(TritonUnavailable) as caught:
        create_backend(bundled, inference)
    assert isinstance(caught.value, UserError)  # shown without a traceback
    message = str(caught.value)
    assert (
        f"inference.backend is 'triton' but the Triton server at {url} ({protocol}) cannot be used" in message
    )
    assert "readiness check failed" in message


def test_auto_never_picks_triton(bundled: Manifest) -> None:
    backend = create_backend(bundled, InferenceConfig(model=BUNDLED, backend="auto"))
    assert backend.name in ("tensorrt", "onnxruntime")


# --------------------------------------------------------------------------- a real local tritonserver


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, Path]]:
    """tritonserver serving the exported cxr-lite0 (max batch 4) and tiny-conv, Python backend."""
    if TRITONSERVER is None:
        pytest.skip(NO_TRITONSERVER)
    root = tmp_path_factory.mktemp("triton")
    tiny = tiny_conv.build(root / "tiny")
    exported = root / "exported"
    for model in (str(BUNDLED), str(tiny)):
        assert (
            export_triton.main(
                ["--model", model, "--out", str(exported), "--kind", "KIND_CPU", "--max-batch", "4"]
            )
            == 0
        )
    repository = python_backend_repository(exported, root / "repository")
    server = TritonServer(TRITONSERVER, repository, root).start()
    try:
        yield server, tiny
    finally:
        server.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_model_matches_onnxruntime(
    local_server: tuple[TritonServer, Path], bundled: Manifest, protocol: str
) -> None:
    server, _ = local_server
    url = server.http_url if protocol == "http" else server.grpc_url
    inference = InferenceConfig(
        model=BUNDLED, backend=TritonBackendConfig(url=url, protocol=protocol), max_batch=8
    )
    backend = create_backend(bundled, inference)
    assert isinstance(backend, TritonBackend)
    # Provenance read back from the server's config, checked against the manifest.
    assert (backend.name, backend.precision) == ("triton", "fp32")
    assert backend.model_sha256 == bundled.onnx[Precision.fp32].sha256
    assert backend.max_batch == 4  # the server's max_batch_size bounds the cart's 8
    assert backend.fallback_reason is None
    batch = real_batch(bundled, 5)  # 5 > 4: two requests, 4 + 1
    reference = OnnxRuntimeBackend(bundled, Precision.fp32, OnnxRuntimeConfig()).run(batch)
    served = backend.run(batch)
    backend.close()
    assert set(served) == set(reference)
    for name, value in reference.items():
        assert served[name].shape == value.shape, name
        np.testing.assert_allclose(served[name], value, atol=1e-5, err_msg=name)


def test_served_model_of_another_manifest_is_refused(
    local_server: tuple[TritonServer, Path], bundled: Manifest
) -> None:
    server, _ = local_server
    config = TritonConfig(url=server.http_url, model_name="tiny-conv")
    with pytest.raises(BackendUnavailable) as caught:
        TritonBackend(bundled, config)
    message = str(caught.value)
    assert (
        f"Triton at {server.http_url}, model 'tiny-conv': served model does not match manifest cxr-lite0"
        in message
    )
    assert "input 'image' has shape [1, 64, 64] per image, the manifest says [1, 256, 256]" in message
    assert "lacks outputs named in the manifest" in message


def test_served_model_from_other_weights_is_refused(
    local_server: tuple[TritonServer, Path], tmp_path: Path
) -> None:
    server, _ = local_server
    retrained = load_manifest(tiny_conv.build(tmp_path / "retrained", seed=3))  # same name and I/O
    with pytest.raises(BackendUnavailable, match="the server runs another model; re-export it"):
        TritonBackend(retrained, TritonConfig(url=server.grpc_url, protocol="grpc"))


def test_model_not_in_repository(local_server: tuple[TritonServer, Path], bundled: Manifest) -> None:
    server, _ = local_server
    with pytest.raises(BackendUnavailable, match="model 'nope': model is not ready"):
        TritonBackend(bundled, TritonConfig(url=server.http_url, model_name="nope"))


# --------------------------------------------------------------------------- an external server


@pytest.mark.skipif(not os.environ.get("TRITON_URL"), reason="no Triton server (set TRITON_URL)")
def test_external_server(bundled: Manifest) -> None:
    """The exported cxr-lite0 on a real deployment (GPU: ONNX Runtime CUDA or a TensorRT plan).

    TRITON_URL=host:port, TRITON_PROTOCOL=http|grpc (default http), TRITON_MODEL (default cxr-lite0).
    """
    config = TritonConfig(
        url=os.environ["TRITON_URL"],
        protocol=os.environ.get("TRITON_PROTOCOL", "http"),
        model_name=os.environ.get("TRITON_MODEL") or None,
    )
    backend = TritonBackend(bundled, config, max_batch=8)
    batch = real_batch(bundled, 6)
    served = backend.run(batch)
    backend.close()
    reference = OnnxRuntimeBackend(bundled, Precision.fp32, OnnxRuntimeConfig()).run(batch)
    # fp32 on a GPU differs in the last bits; a plan is held to the parity gate, not this bound.
    tolerance = 1e-3 if backend.precision == "fp32" else 5e-2
    for name, value in reference.items():
        np.testing.assert_allclose(served[name], value, atol=tolerance, rtol=tolerance, err_msg=name)
