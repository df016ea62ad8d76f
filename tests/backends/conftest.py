"""Fixtures for backend tests: the tiny conv model (built here) and whether TensorRT exists here."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.backends.tensorrt import import_tensorrt
from appliance.errors import BackendUnavailable
from tests.backends import tiny_conv


def tensorrt_missing() -> str | None:
    """The reason TensorRT cannot be used here, or None where it can."""
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return tiny_conv.build(tmp_path / "tiny")
