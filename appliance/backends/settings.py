"""`inference.backend` as a discriminated union, and the reader for the older config shape.

New shape (each variant's class lives in its backend's file; `backend: NAME` = `{type: NAME}`):

    inference:
      precision: auto          # one precision for every backend
      max_batch: 4             # one batch setting; TensorRT's profile is 1 / 1 / max_batch
      backend: {type: auto, tensorrt: {workspace_mb: 1024}, onnxruntime: {intra_op_threads: 0}}

Older shape, as written by every installed cart's config (from config/example.yaml):

    inference:
      backend: auto
      precision: fp32          # meant ONNX Runtime only
      max_batch: 4
      onnxruntime: {...}
      tensorrt: {precision: fp16, opt_batch: 1, max_batch: 4, workspace_mb: 1024}
      triton: {...}

The sibling sections still work next to a plain `backend: NAME` and move into the backend mapping.
The two TensorRT-only keys are read with a deprecation warning naming their line where the one
setting keeps the old behaviour: opt_batch (the profile's optimum is now always 1) and max_batch (the
engine's max is now inference.max_batch; a different value means tools/engines/build_engine.py --if-needed
builds a new engine, as the boot-time build unit does). tensorrt.precision is read the same way when
inference.precision says the same thing (fp32 + fp16 was `auto`); where the two disagree (TensorRT
int8, ONNX Runtime fp32) no single value keeps both, and choosing one would silently change which
numeric model a cart runs: that config is refused, naming the lines and the new key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from appliance.backends.onnxruntime import OnnxRuntimeBackendConfig
from appliance.backends.select import AutoBackendConfig
from appliance.backends.tensorrt import OPT_BATCH, TensorRTBackendConfig
from appliance.backends.triton import TritonBackendConfig
from appliance.errors import ConfigError
from appliance.yamlsource import Location, where

log = logging.getLogger("appliance.config")

InferencePrecision = Literal["auto", "fp32", "fp16", "int8", "best"]
BackendConfig = Annotated[
    AutoBackendConfig | OnnxRuntimeBackendConfig | TensorRTBackendConfig | TritonBackendConfig,
    Field(discriminator="type"),
]
_VARIANTS = (AutoBackendConfig, OnnxRuntimeBackendConfig, TensorRTBackendConfig, TritonBackendConfig)
BACKEND_TYPES = tuple(str(variant.model_fields["type"].default) for variant in _VARIANTS)
SECTIONS = ("onnxruntime", "tensorrt", "triton")
_USES = {"auto": ("tensorrt", "onnxruntime"), "tensorrt": ("tensorrt",)}


class _Source:
    """Where keys of the `inference` mapping were written (when loaded from a YAML file)."""

    def __init__(self, context: Mapping[str, Any] | None) -> None:
        context = context or {}
        self.file: Path | None = context.get("source")
        self.lines: Mapping[Location, int] = context.get("lines", {})

    def at(self, *keys: str) -> str:
        return where(self.file, ("inference", *keys), self.lines)


def _plain(name: str, section: Any, source: _Source) -> dict[str, Any]:
    # Python callers pass the old sections as models (InferenceConfig(triton=TritonConfig(...))).
    if isinstance(section, BaseModel):
        return section.model_dump(exclude_unset=True)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source.at(name)}: inference.{name}: expected a mapping of settings")
    return dict(section)


def upgrade_inference(data: Any, context: Mapping[str, Any] | None) -> Any:
    """The `inference` mapping in the new shape; older keys moved (warned) or refused (ConfigError)."""
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    backend = data.get("backend", "auto")
    if isinstance(backend, str):
        backend = {"type": backend}
    elif isinstance(backend, BaseModel):
        backend = {**backend.model_dump(exclude_unset=True), "type": getattr(backend, "type", None)}
    sections = {name: data.pop(name) for name in SECTIONS if name in data}
    data["backend"] = backend
    if not sections or not isinstance(backend, Mapping):  # nothing to move, or pydantic reports it
        return data
    source = _Source(context)
    if set(backend) != {"type"}:
        first = next(iter(sections))
        raise ConfigError(
            f"{source.at(first)}: inference.{first}: with inference.backend written as a mapping"
            f" ({source.at('backend')}), give these settings inside it: inference.backend.{first} for"
            f" type auto, or directly under inference.backend for type {first}"
        )
    kind = str(backend.get("type"))
    used = _USES.get(kind, (kind,))
    moved = {name: _plain(name, section, source) for name, section in sections.items() if name in used}
    if "tensorrt" in used:  # an older-shape config: its precision meant ONNX Runtime only
        _read_engine_keys(data, moved.setdefault("tensorrt", {}), kind, source)
    data["backend"] = {**backend, **moved} if kind == "auto" else {**backend, **moved.get(kind, {})}
    return data


def _read_engine_keys(data: dict[str, Any], tensorrt: dict[str, Any], kind: str, source: _Source) -> None:
    """Fold tensorrt.precision/opt_batch/max_batch into inference.precision/max_batch, or refuse."""
    notes: list[str] = []
    if "opt_batch" in tensorrt:
        value = tensorrt.pop("opt_batch")
        notes.append(
            f"{source.at('tensorrt', 'opt_batch')}: inference.tensorrt.opt_batch {value} is no longer read"
            f" (the engine profile's optimum is always {OPT_BATCH}); delete it"
        )
    if "max_batch" in tensorrt:
        value = tensorrt.pop("max_batch")
        batch = data.get("max_batch", 4)
        change = "" if value == batch else f"; the engine is now built for {batch}, not {value}"
        notes.append(
            f"{source.at('tensorrt', 'max_batch')}: inference.tensorrt.max_batch is replaced by"
            f" inference.max_batch ({batch}){change}; delete it"
        )
    written = "precision" in tensorrt
    engine = tensorrt.pop("precision", "fp16")  # the old default
    onnxruntime = data.get("precision", "fp32")  # the old default, for ONNX Runtime only
    if kind == "tensorrt" or engine == onnxruntime:
        merged = engine  # ONNX Runtime never runs, or both ran the same precision
    elif (onnxruntime, engine) == ("fp32", "fp16"):
        merged = "auto"
    else:
        raise ConfigError(
            f"{source.at('tensorrt', 'precision') if written else source.at('tensorrt')}:"
            f" inference.tensorrt.precision ({engine}{'' if written else ', its old default'}) and"
            f" inference.precision ({onnxruntime}, {source.at('precision')}) differ, and one setting,"
            " inference.precision, now sets both TensorRT and the ONNX Runtime fallback: choose"
            f" inference.precision: {engine} (the fallback then runs the {engine} model too) or auto"
            " (TensorRT fp16, ONNX Runtime fp32), and delete inference.tensorrt.precision"
        )
    if written:
        notes.append(
            f"{source.at('tensorrt', 'precision')}: inference.tensorrt.precision is read as"
            f" inference.precision: {merged} (the same engines and fallback as before); write that and delete it"
        )
    elif "precision" in data and merged != onnxruntime:
        notes.append(
            f"{source.at('precision')}: inference.precision {onnxruntime} meant ONNX Runtime only and is read as"
            f" {merged} (TensorRT fp16, ONNX Runtime fp32, as before); write inference.precision: {merged}"
        )
    data["precision"] = merged
    for note in notes:
        log.warning("deprecated config: %s", note)


def add_older_shape_to_schema(properties: dict[str, Any]) -> None:
    """pydantic's schema knows the mapping form only; editors should accept what upgrade_inference reads."""
    mapping = dict(properties["backend"])
    properties["backend"] = {
        "description": mapping.pop("description", ""),
        "default": "auto",
        "anyOf": [{"enum": list(BACKEND_TYPES)}, mapping],
    }
    for name in SECTIONS:
        properties[name] = {
            "type": "object",
            "deprecated": True,
            "description": f"Older shape, next to `backend: NAME`: read as inference.backend's {name} settings.",
        }
