"""Fixtures for backend tests: the tiny conv model (built here) and whether TensorRT exists here."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.backends.tensorrt import current_device, import_tensorrt
from appliance.errors import BackendUnavailable
from tests.backends import tiny_conv


def tensorrt_missing() -> str | None:
    """Why TensorRT's Python package does not import here, or None where it does."""
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    return None


def tensorrt_unusable() -> str | None:
    """Why engines cannot be built and run here (no TensorRT, no pycuda, no CUDA GPU), or None where they
    can: a machine with the TensorRT wheel but no GPU skips with that reason instead of failing."""
    try:
        current_device()
    except BackendUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return tiny_conv.build(tmp_path / "tiny")
