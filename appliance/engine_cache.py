"""Which TensorRT engine belongs to which ONNX, precision, builder settings and device.

A TensorRT engine only runs on the GPU, TensorRT version and (on a Jetson) L4T release it was built
for, with the builder settings it was built with. Each engine file therefore has a cache key (sha256
of everything that shaped it) in its file name and a JSON sidecar holding the same facts in clear,
plus the engine's own sha256 and the parity-check verdict. An engine is only loaded when the sidecar
recomputes to the key expected for *this* device and *this* ONNX: anything else is rebuilt or refused.

Nothing here imports TensorRT: the identity of the device is passed in (see DeviceIdentity).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.durable import write_atomically
from appliance.errors import BackendUnavailable
from appliance.manifest import sha256_file

# Bump when the meaning of a key field changes, so old engines are never taken for new ones.
KEY_SCHEMA = 2  # 2: the board and memory joined the device identity
L4T_RELEASE_FILE = Path("/etc/nv_tegra_release")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceIdentity(_Frozen):
    """What a serialized engine is tied to: the GPU, the TensorRT build and the Jetson software release."""

    gpu_name: str
    compute_capability: str = Field(description="'major.minor', e.g. '8.7' for Jetson Orin.")
    tensorrt_version: str
    l4t_release: str | None = Field(
        None, description="e.g. 'R36.4.3' from /etc/nv_tegra_release; None off-Jetson."
    )
    # Jetson modules share a GPU name ("Orin") and compute capability, but an engine built on one may
    # not run right on another (AGX vs NX vs Nano, 8 vs 16 GB): the board and the memory tell them apart.
    board: str | None = Field(None, description="/proc/device-tree/model, e.g. 'NVIDIA Jetson AGX Orin'.")
    memory_mb: int | None = Field(None, description="The GPU's total memory (MiB).")


class BuildSpec(_Frozen):
    """Everything the builder is told; two engines with equal specs on equal devices are interchangeable."""

    model: str
    onnx_sha256: str
    precision: Literal["fp16", "int8", "best"]
    int8_source: Literal["qdq", "calibration"] | None = Field(
        None,
        description="qdq: explicit Q/DQ ONNX (TensorRT 10); calibration: entropy calibrator (TensorRT 8.x).",
    )
    input_name: str
    input_shape: tuple[int, ...] = Field(
        description="One sample's shape without the batch axis, e.g. (1, 320, 320)."
    )
    min_batch: int = 1
    opt_batch: int
    max_batch: int
    workspace_mb: int
    dla_core: int | None = None


def cache_key(spec: BuildSpec, device: DeviceIdentity) -> str:
    """sha256 of the canonical JSON of spec + device; any change in either gives another key."""
    payload = {
        "schema": KEY_SCHEMA,
        "spec": spec.model_dump(mode="json"),
        "device": device.model_dump(mode="json"),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ParityRecord(_Frozen):
    passed: bool
    checked_at: str
    images: int
    report: str | None = Field(None, description="Path of the parity report JSON.")


class EngineRecord(_Frozen):
    """The sidecar JSON next to each engine file."""

    key_schema: int = KEY_SCHEMA
    key: str
    spec: BuildSpec
    device: DeviceIdentity
    engine_file: str = Field(description="File name, in the same folder as the sidecar.")
    engine_sha256: str
    built_at: str
    build_seconds: float
    calibration: str | None = Field(
        None, description="TensorRT 8.x INT8: identity of the calibration image set (not part of the key)."
    )
    parity: ParityRecord | None = None


def engine_stem(spec: BuildSpec, key: str) -> str:
    # The key prefix in the name lets engines for several devices/settings share one cache folder.
    return f"{spec.model}.{spec.precision}.{key[:16]}"


def engine_paths(cache_dir: Path, spec: BuildSpec, key: str) -> tuple[Path, Path]:
    """(engine file, sidecar JSON) for this spec and key."""
    stem = engine_stem(spec, key)
    return cache_dir / f"{stem}.engine", cache_dir / f"{stem}.json"


def timing_cache_path(cache_dir: Path, device: DeviceIdentity) -> Path:
    """One timing cache per GPU + TensorRT version: TensorRT refuses (or mis-times) caches from others."""
    tag = re.sub(
        r"[^A-Za-z0-9.]+",
        "-",
        f"{device.gpu_name}-sm{device.compute_capability}-trt{device.tensorrt_version}",
    )
    return cache_dir / f"{tag.strip('-')}.timing.cache"


def parse_l4t_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: …' -> 'R36.4.3'."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2).rstrip('.')}" if match else None


def read_l4t_release(path: Path = L4T_RELEASE_FILE) -> str | None:
    try:
        return parse_l4t_release(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None


def read_board(path: Path = Path("/proc/device-tree/model")) -> str | None:
    """The board's model name (Jetson and other device-tree machines); None elsewhere."""
    try:
        return path.read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_atomic(path: Path, data: bytes) -> None:
    # A power cut during a build never leaves a half engine under the final name.
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def store_engine(
    cache_dir: Path,
    spec: BuildSpec,
    device: DeviceIdentity,
    engine: bytes,
    build_seconds: float,
    calibration: str | None = None,
) -> EngineRecord:
    """Write the engine and its sidecar (engine first: a sidecar never points at a missing file)."""
    key = cache_key(spec, device)
    engine_path, sidecar_path = engine_paths(cache_dir, spec, key)
    _write_atomic(engine_path, engine)
    record = EngineRecord(
        key=key,
        spec=spec,
        device=device,
        engine_file=engine_path.name,
        engine_sha256=hashlib.sha256(engine).hexdigest(),
        built_at=utc_now(),
        build_seconds=round(build_seconds, 1),
        calibration=calibration,
    )
    write_record(sidecar_path, record)
    return record


def write_record(sidecar_path: Path, record: EngineRecord) -> None:
    _write_atomic(sidecar_path, (record.model_dump_json(indent=2) + "\n").encode("utf-8"))


def record_parity(sidecar_path: Path, parity: ParityRecord) -> EngineRecord:
    record = read_record(sidecar_path)
    updated = record.model_copy(update={"parity": parity})
    write_record(sidecar_path, updated)
    return updated


def read_record(sidecar_path: Path) -> EngineRecord:
    try:
        return EngineRecord.model_validate_json(sidecar_path.read_bytes())
    except OSError as exc:
        raise EngineMismatch(f"{sidecar_path}: cannot read engine sidecar: {exc.strerror}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EngineMismatch(f"{sidecar_path}: invalid engine sidecar ({where}: {first['msg']})") from exc


class EngineMismatch(BackendUnavailable):
    """A cached engine is missing, damaged or was built for something else; it must not be loaded."""


def differences(record: EngineRecord, spec: BuildSpec, device: DeviceIdentity) -> list[str]:
    """Human-readable reasons why `record` does not fit (empty when it does)."""
    found: list[str] = []
    if record.key_schema != KEY_SCHEMA:
        found.append(f"key schema {record.key_schema} != {KEY_SCHEMA}")
    for label, have, want in (("build", record.spec, spec), ("device", record.device, device)):
        have_fields, want_fields = have.model_dump(mode="json"), want.model_dump(mode="json")
        for name in sorted(want_fields):
            if have_fields.get(name) != want_fields[name]:
                found.append(
                    f"{label}.{name}: engine has {have_fields.get(name)!r}, here {want_fields[name]!r}"
                )
    expected = cache_key(spec, device)
    if not found and record.key != expected:
        found.append("stored key does not match its own fields (sidecar edited?)")
    return found


def find_engine(cache_dir: Path, spec: BuildSpec, device: DeviceIdentity) -> tuple[Path, EngineRecord]:
    """The engine built for exactly this spec on this device, verified; EngineMismatch says why not."""
    key = cache_key(spec, device)
    engine_path, sidecar_path = engine_paths(cache_dir, spec, key)
    if not sidecar_path.is_file():
        others = sorted(p.name for p in cache_dir.glob(f"{spec.model}.*.json")) if cache_dir.is_dir() else []
        hint = f" (other engines there: {', '.join(others)})" if others else ""
        raise EngineMismatch(f"no engine for this device and settings in {cache_dir} (key {key[:16]}){hint}")
    record = read_record(sidecar_path)
    problems = differences(record, spec, device)
    if problems:
        raise EngineMismatch(f"{sidecar_path}: engine was built for something else: {'; '.join(problems)}")
    if record.engine_file != engine_path.name or not engine_path.is_file():
        raise EngineMismatch(f"{engine_path}: engine file named by its sidecar is missing")
    digest = sha256_file(engine_path)
    if digest != record.engine_sha256:
        raise EngineMismatch(
            f"{engine_path}: sha256 {digest[:12]}… does not match its sidecar (damaged engine)"
        )
    return engine_path, record


def list_records(cache_dir: Path) -> list[tuple[Path, EngineRecord | str]]:
    """Every sidecar in the cache with its record, or the reason it cannot be read (for `doctor`)."""
    found: list[tuple[Path, EngineRecord | str]] = []
    for sidecar in sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []:
        try:
            found.append((sidecar, read_record(sidecar)))
        except EngineMismatch as exc:
            found.append((sidecar, str(exc)))
    return found
