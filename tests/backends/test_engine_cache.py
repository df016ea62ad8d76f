"""Cache keys and sidecars: an engine is found only for the exact ONNX, settings and device it was built for.

The engine bytes here are opaque test bytes: the cache never interprets an engine, it only stores,
hashes and matches it (real engines are exercised in test_tensorrt.py where TensorRT exists).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.engine_cache import (
    BuildSpec,
    DeviceIdentity,
    EngineMismatch,
    ParityRecord,
    cache_key,
    engine_paths,
    find_engine,
    list_records,
    parse_l4t_release,
    read_board,
    read_record,
    record_parity,
    store_engine,
    timing_cache_path,
)
from tests.backends.engine_records import ORIN, SPEC


@pytest.mark.parametrize(
    ("spec_change", "device_change"),
    [
        ({"onnx_sha256": "b" * 64}, {}),
        ({"precision": "int8", "int8_source": "qdq"}, {}),
        ({"workspace_mb": 2048}, {}),
        ({"max_batch": 8}, {}),
        ({"opt_batch": 2}, {}),
        ({"dla_core": 0}, {}),
        ({"input_shape": (1, 128, 128)}, {}),
        ({}, {"gpu_name": "Xavier"}),
        ({}, {"compute_capability": "7.2"}),
        ({}, {"tensorrt_version": "10.3.1"}),
        ({}, {"l4t_release": "R36.3.0"}),
        ({}, {"l4t_release": None}),
        # Found by a review run: AGX, NX and Nano Orin share a GPU name and compute capability.
        ({}, {"board": "NVIDIA Jetson Orin Nano Developer Kit"}),
        ({}, {"memory_mb": 7620}),
    ],
)
def test_every_field_changes_the_key(
    spec_change: dict[str, object], device_change: dict[str, object]
) -> None:
    changed = cache_key(SPEC.model_copy(update=spec_change), ORIN.model_copy(update=device_change))
    assert changed != cache_key(SPEC, ORIN)


def test_key_is_stable_for_equal_inputs() -> None:
    again = BuildSpec.model_validate(json.loads(SPEC.model_dump_json()))
    assert cache_key(again, DeviceIdentity(**ORIN.model_dump())) == cache_key(SPEC, ORIN)
    assert len(cache_key(SPEC, ORIN)) == 64


def test_store_then_find_round_trip(tmp_path: Path) -> None:
    record = store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 12.34)
    path, found = find_engine(tmp_path, SPEC, ORIN)
    assert path.read_bytes() == b"engine-bytes"
    assert found == record
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["device"]["l4t_release"] == "R36.4.3"
    assert sidecar["spec"]["onnx_sha256"] == "a" * 64
    assert sidecar["key"] == cache_key(SPEC, ORIN)
    assert sidecar["parity"] is None
    assert [p.name for p, _ in list_records(tmp_path)] == [path.with_suffix(".json").name]


def test_engine_for_another_device_is_not_found(tmp_path: Path) -> None:
    store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 1.0)
    other = ORIN.model_copy(update={"tensorrt_version": "10.4.0"})
    with pytest.raises(EngineMismatch, match=r"no engine for this device.*other engines there: tiny\.fp16\."):
        find_engine(tmp_path, SPEC, other)


def test_sidecar_from_another_device_under_our_name_is_refused(tmp_path: Path) -> None:
    """A file copied/renamed from another cart must be refused on its content, not trusted on its name."""
    record = store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 1.0)
    xavier = ORIN.model_copy(update={"gpu_name": "Xavier", "compute_capability": "7.2"})
    engine, sidecar = engine_paths(tmp_path, SPEC, record.key)
    wanted_engine, wanted_sidecar = engine_paths(tmp_path, SPEC, cache_key(SPEC, xavier))
    engine.rename(wanted_engine)
    sidecar.rename(wanted_sidecar)
    with pytest.raises(EngineMismatch, match=r"device\.gpu_name: engine has 'Orin', here 'Xavier'"):
        find_engine(tmp_path, SPEC, xavier)


def test_damaged_engine_is_refused(tmp_path: Path) -> None:
    store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 1.0)
    engine, _ = engine_paths(tmp_path, SPEC, cache_key(SPEC, ORIN))
    engine.write_bytes(b"engine-byteZ")
    with pytest.raises(EngineMismatch, match="damaged engine"):
        find_engine(tmp_path, SPEC, ORIN)


def test_edited_key_and_broken_sidecar_are_refused(tmp_path: Path) -> None:
    store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 1.0)
    _, sidecar = engine_paths(tmp_path, SPEC, cache_key(SPEC, ORIN))
    body = json.loads(sidecar.read_text())
    body["key"] = "0" * 64
    sidecar.write_text(json.dumps(body))
    with pytest.raises(EngineMismatch, match="stored key does not match"):
        find_engine(tmp_path, SPEC, ORIN)
    sidecar.write_text("{not json")
    with pytest.raises(EngineMismatch, match=rf"{sidecar.name}: invalid engine sidecar"):
        find_engine(tmp_path, SPEC, ORIN)


def test_missing_engine_file_is_refused(tmp_path: Path) -> None:
    store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 1.0)
    engine, _ = engine_paths(tmp_path, SPEC, cache_key(SPEC, ORIN))
    engine.unlink()
    with pytest.raises(EngineMismatch, match="engine file named by its sidecar is missing"):
        find_engine(tmp_path, SPEC, ORIN)


def test_parity_verdict_is_kept_in_the_sidecar(tmp_path: Path) -> None:
    store_engine(tmp_path, SPEC, ORIN, b"engine-bytes", 1.0)
    _, sidecar = engine_paths(tmp_path, SPEC, cache_key(SPEC, ORIN))
    record_parity(sidecar, ParityRecord(passed=False, checked_at="2026-01-01T00:00:00+00:00", images=200))
    assert read_record(sidecar).parity == ParityRecord(
        passed=False, checked_at="2026-01-01T00:00:00+00:00", images=200
    )
    find_engine(tmp_path, SPEC, ORIN)  # the verdict does not change which engine this is


@pytest.mark.parametrize(
    ("text", "release"),
    [
        (
            "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan 8\n",
            "R36.4.3",
        ),
        (
            "# R35 (release), REVISION: 5.0, GCID: 35550185, BOARD: t186ref, EABI: aarch64, DATE: Tue Feb 20\n",
            "R35.5.0",
        ),
        ("garbage", None),
    ],
)
def test_l4t_release_parsing(text: str, release: str | None) -> None:
    assert parse_l4t_release(text) == release


def test_timing_cache_is_per_gpu_and_version(tmp_path: Path) -> None:
    other = ORIN.model_copy(update={"tensorrt_version": "10.4.0"})
    assert timing_cache_path(tmp_path, ORIN) != timing_cache_path(tmp_path, other)
    assert timing_cache_path(tmp_path, ORIN).name == "Orin-sm8.7-trt10.3.0.timing.cache"


def test_the_board_is_read_from_the_device_tree(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert read_board(model) == "NVIDIA Jetson AGX Orin Developer Kit"
    assert read_board(tmp_path / "absent") is None
