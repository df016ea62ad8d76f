"""Triton backend: the same model served by NVIDIA Triton Inference Server when a site outgrows one cart.

The model repository comes from tools/engines/export_triton.py, which writes the model's provenance into
config.pbtxt `parameters` (model_sha256, precision, onnx_precision, manifest name/version). At start
the backend reads the server's model metadata and config back and refuses a model that does not
match the local manifest (input name and shape, output names, ONNX sha256): a result must never
claim a model the server does not run.

tritonclient is imported lazily (optional extra `triton`), like TensorRT, so this module imports
everywhere and a missing client is a plain error. The helpers above TritonBackend are pure and
tested on their own; the class only adds the network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.errors import BackendUnavailable
from appliance.manifest import Manifest, Precision

log = logging.getLogger(__name__)

# Keys tools/engines/export_triton.py writes into config.pbtxt `parameters`; read back here.
PARAM_SHA256 = "model_sha256"
PARAM_PRECISION = "precision"
PARAM_ONNX_PRECISION = "onnx_precision"
PARAM_MODEL = "manifest_name"
PARAM_VERSION = "manifest_version"

# ONNX Runtime and TensorRT take float32 in and give float32 out for every model we ship.
_NUMPY_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}


class TritonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        "localhost:8000",
        description="host:port of the Triton server, no scheme (HTTP usually 8000, gRPC 8001).",
    )
    protocol: Literal["http", "grpc"] = "http"
    model_name: str | None = Field(
        None, description="Model name in the repository; default the manifest's name."
    )
    model_version: str = Field("", description="'' lets the server's version policy choose (latest).")
    timeout_s: float = Field(30.0, gt=0, description="Connection and per-request timeout.")
    ssl: bool = Field(False, description="Talk TLS (HTTPS or gRPC over TLS).")
    ca_file: Path | None = Field(None, description="CA that signed the server's certificate (with ssl).")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Client key for mutual TLS.")
    insecure_skip_verify: bool = Field(
        False, description="HTTP only: do not match the host name with the certificate. Bench tests only."
    )
    verbose: bool = Field(False, description="tritonclient prints every request and response (debugging).")

    @field_validator("url")
    @classmethod
    def _host_port(cls, value: str) -> str:
        # tritonclient takes host:port; a scheme would be silently mangled into the host name.
        if "://" in value:
            raise ValueError("give host:port without a scheme (set ssl: true for TLS)")
        if not value or value.rsplit(":", 1)[-1] == "" or value.startswith(":"):
            raise ValueError("give host:port, e.g. triton.ward.local:8000")
        return value

    @model_validator(mode="after")
    def _tls_options(self) -> TritonConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together (mutual TLS)")
        uses_tls_files = self.ca_file or self.cert_file or self.insecure_skip_verify
        if uses_tls_files and not self.ssl:
            raise ValueError("ca_file, cert_file, key_file and insecure_skip_verify need ssl: true")
        if self.insecure_skip_verify and self.protocol == "grpc":
            raise ValueError("insecure_skip_verify is supported for protocol http only")
        return self


class TritonBackendConfig(TritonConfig):
    """`inference.backend: {type: triton, url: ...}`: only when named, never chosen by auto."""

    type: Literal["triton"] = "triton"


def import_client(protocol: str) -> ModuleType:
    """tritonclient.http or tritonclient.grpc, or BackendUnavailable saying what to install."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except Exception as exc:  # ImportError, or a dependency's own error (gevent, grpcio)
        raise BackendUnavailable(
            f"tritonclient[{protocol}] is not installed ({exc}); pip install 'cxr-appliance[triton]'"
        ) from exc
    return client


# --------------------------------------------------------------------------- pure helpers


def _dims(values: Sequence[Any]) -> list[int]:
    # gRPC metadata as JSON carries int64 as strings; HTTP carries numbers.
    return [int(v) for v in values]


def normalise_metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Model metadata from either protocol as {name, platform, inputs/outputs: [{name, datatype, shape}]}."""
    tensors = {
        key: [
            {"name": t["name"], "datatype": t.get("datatype", ""), "shape": _dims(t.get("shape", []))}
            for t in raw.get(key, [])
        ]
        for key in ("inputs", "outputs")
    }
    return {"name": raw.get("name", ""), "platform": raw.get("platform", ""), **tensors}


def normalise_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Model config from either protocol (gRPC wraps it in {"config": ...}) as a plain dict."""
    config = dict(raw.get("config", raw))
    config["max_batch_size"] = int(config.get("max_batch_size", 0))
    config["parameters"] = {
        key: value.get("string_value", "") if isinstance(value, Mapping) else str(value)
        for key, value in dict(config.get("parameters", {})).items()
    }
    return config


def metadata_problems(manifest: Manifest, metadata: Mapping[str, Any], max_batch_size: int) -> list[str]:
    """Why the served model is not the manifest's model (empty when it is); `metadata` is normalised."""
    problems: list[str] = []
    batched = max_batch_size > 0
    inputs = {t["name"]: t for t in metadata["inputs"]}
    expected_input = manifest.input.name
    if list(inputs) != [expected_input]:
        problems.append(f"inputs {list(inputs)}, the manifest expects exactly [{expected_input!r}]")
    else:
        tensor = inputs[expected_input]
        shape = tensor["shape"][1:] if batched else tensor["shape"]
        want = list(manifest.input.sample_shape)
        if len(shape) != len(want) or any(
            have not in (want_d, -1) for have, want_d in zip(shape, want, strict=True)
        ):
            problems.append(f"input {expected_input!r} has shape {shape} per image, the manifest says {want}")
        wanted_type = _NUMPY_TO_TRITON[np.dtype(manifest.input.dtype)]
        if tensor["datatype"] != wanted_type:
            problems.append(
                f"input {expected_input!r} is {tensor['datatype']}, the manifest says {wanted_type}"
            )
    served = {t["name"] for t in metadata["outputs"]}
    missing = [o.name for o in manifest.outputs if o.name not in served]
    if missing:
        problems.append(f"lacks outputs named in the manifest: {missing}")
    if not batched:
        problems.append(
            "max_batch_size is 0 (no batch axis); export it with tools/engines/export_triton.py --max-batch N"
        )
    return problems


def served_provenance(manifest: Manifest, parameters: Mapping[str, str]) -> tuple[str, str]:
    """(precision, ONNX sha256) the server says it runs, checked against the local manifest.

    Raises BackendUnavailable for a repository not written by tools/engines/export_triton.py or exported
    from another model/version of the ONNX than the one this appliance's manifest names.
    """
    sha = parameters.get(PARAM_SHA256, "")
    onnx_precision = parameters.get(PARAM_ONNX_PRECISION, "")
    precision = parameters.get(PARAM_PRECISION, "") or onnx_precision
    if not sha or not onnx_precision:
        raise BackendUnavailable(
            f"model config has no {PARAM_SHA256}/{PARAM_ONNX_PRECISION} parameters: the repository was"
            " not written by tools/engines/export_triton.py, so its provenance is unknown; re-export it"
        )
    try:
        entry = manifest.onnx[Precision(onnx_precision)]
    except (ValueError, KeyError):
        available = ", ".join(p.value for p in manifest.onnx)
        raise BackendUnavailable(
            f"served model was exported from the {onnx_precision} ONNX, which manifest {manifest.name}"
            f" does not list (it has {available})"
        ) from None
    if entry.sha256 != sha:
        served_as = f"{parameters.get(PARAM_MODEL, '?')} {parameters.get(PARAM_VERSION, '?')}"
        raise BackendUnavailable(
            f"served model ({served_as}) was exported from ONNX sha256 {sha[:12]}…, but manifest"
            f" {manifest.name} {manifest.version} lists {entry.sha256[:12]}… for {onnx_precision}:"
            " the server runs another model; re-export it with tools/engines/export_triton.py"
        )
    return precision, sha


def split_batch(batch: np.ndarray, max_batch: int) -> list[np.ndarray]:
    """Chunks of at most max_batch images (the server refuses larger requests)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, not {max_batch}")
    return [batch[i : i + max_batch] for i in range(0, batch.shape[0], max_batch)]


def build_inputs(client: ModuleType, name: str, chunk: np.ndarray) -> list[Any]:
    """The request's one input tensor (binary data over HTTP: JSON would be ~4x larger)."""
    data = np.ascontiguousarray(chunk)
    datatype = _NUMPY_TO_TRITON.get(data.dtype)
    if datatype is None:
        raise ValueError(f"input dtype {data.dtype} is not sent to Triton (float32 or float16 only)")
    tensor = client.InferInput(name, list(data.shape), datatype)
    if client.__name__.endswith("http"):
        tensor.set_data_from_numpy(data, binary_data=True)
    else:
        tensor.set_data_from_numpy(data)
    return [tensor]


def requested_outputs(client: ModuleType, names: Sequence[str]) -> list[Any]:
    if client.__name__.endswith("http"):
        return [client.InferRequestedOutput(name, binary_data=True) for name in names]
    return [client.InferRequestedOutput(name) for name in names]


def collect_outputs(result: Any, names: Sequence[str], count: int) -> dict[str, np.ndarray]:
    """Every requested output by name, as float32, each with `count` rows; ValueError says what is wrong."""
    outputs: dict[str, np.ndarray] = {}
    for name in names:
        value = result.as_numpy(name)
        if value is None:
            raise ValueError(f"response lacks output {name!r}")
        if value.ndim == 0 or value.shape[0] != count:
            raise ValueError(f"output {name!r} has shape {value.shape} for a batch of {count}")
        outputs[name] = np.asarray(value, dtype=np.float32)
    return outputs


# --------------------------------------------------------------------------- backend


def _make_client(client: ModuleType, config: TritonConfig) -> Any:
    if config.protocol == "grpc":
        return client.InferenceServerClient(
            url=config.url,
            verbose=config.verbose,
            ssl=config.ssl,
            root_certificates=str(config.ca_file) if config.ca_file else None,
            private_key=str(config.key_file) if config.key_file else None,
            certificate_chain=str(config.cert_file) if config.cert_file else None,
        )
    ssl_options: dict[str, str] = {}
    if config.ca_file:
        ssl_options["ca_certs"] = str(config.ca_file)
    if config.cert_file and config.key_file:
        ssl_options |= {"certfile": str(config.cert_file), "keyfile": str(config.key_file)}
    factory = None
    if config.ssl:
        import gevent.ssl  # tritonclient[http] depends on it; secure defaults instead of a bare wrap

        factory = gevent.ssl.create_default_context
    return client.InferenceServerClient(
        url=config.url,
        verbose=config.verbose,
        connection_timeout=config.timeout_s,
        network_timeout=config.timeout_s,
        ssl=config.ssl,
        ssl_options=ssl_options or None,
        ssl_context_factory=factory,
        insecure=config.insecure_skip_verify,
    )


class TritonBackend:
    """Sends each batch to a Triton server; the server's dynamic batcher merges requests from many carts."""

    name = "triton"

    def __init__(self, manifest: Manifest, config: TritonConfig, max_batch: int = 4) -> None:
        self._module = import_client(config.protocol)
        self.fallback_reason: str | None = None
        self.url = config.url
        self.model_name = config.model_name or manifest.name
        self.model_version = config.model_version
        self.input_name = manifest.input.name
        self._timeout = config.timeout_s
        self._grpc = config.protocol == "grpc"
        self._client = _make_client(self._module, config)
        try:
            self._check_model(manifest)
        except BaseException:
            self.close()
            raise
        # Never send more than the server accepts, nor more than this cart batches anyway.
        self.max_batch = min(max_batch, self._server_max_batch)

    def _where(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"Triton at {self.url}, model {self.model_name!r}{version}"

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One client call; any failure (refused, timeout, server error) as BackendUnavailable naming the URL."""
        if self._grpc:
            kwargs["client_timeout"] = self._timeout
        try:
            return getattr(self._client, method)(**kwargs)
        except Exception as exc:  # InferenceServerException, socket/gevent/grpc errors alike
            raise BackendUnavailable(f"{self._where()}: {what} failed: {exc}") from exc

    def _check_model(self, manifest: Manifest) -> None:
        ident = {"model_name": self.model_name, "model_version": self.model_version}
        if not self._call("readiness check", "is_model_ready", **ident):
            raise BackendUnavailable(
                f"{self._where()}: model is not ready (not in the repository, or failed to load: see the"
                " server's log)"
            )
        as_json = {"as_json": True} if self._grpc else {}
        metadata = normalise_metadata(self._call("model metadata", "get_model_metadata", **ident, **as_json))
        config = normalise_config(self._call("model config", "get_model_config", **ident, **as_json))
        problems = metadata_problems(manifest, metadata, config["max_batch_size"])
        if problems:
            raise BackendUnavailable(
                f"{self._where()}: served model does not match manifest {manifest.name}: {'; '.join(problems)}"
            )
        self.precision, self.model_sha256 = served_provenance(manifest, config["parameters"])
        self._server_max_batch = config["max_batch_size"]
        self.output_names = [t["name"] for t in metadata["outputs"]]
        self.platform = metadata["platform"]
        log.info(
            "%s: %s, %s, sha256 %s…, max batch %d",
            self._where(),
            self.platform,
            self.precision,
            self.model_sha256[:12],
            self._server_max_batch,
        )

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        parts = [self._infer(chunk) for chunk in split_batch(batch, self.max_batch)]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.output_names}

    def _infer(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        request = {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "inputs": build_inputs(self._module, self.input_name, chunk),
            "outputs": requested_outputs(self._module, self.output_names),
        }
        result = self._call(f"inference on {chunk.shape[0]} image(s)", "infer", **request)
        try:
            return collect_outputs(result, self.output_names, chunk.shape[0])
        except ValueError as exc:
            raise BackendUnavailable(f"{self._where()}: {exc}") from exc

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as exc:  # closing a dead connection must not hide the error that led here
            log.debug("closing the Triton client: %s", exc)
