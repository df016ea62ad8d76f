"""Fixtures for the fault tests: a tiny real ONNX model, daemons that are always stopped, real images."""

from __future__ import annotations

from pathlib import Path

from testsupport import data
from testsupport.daemon import RESULT_TOPIC, STATUS_TOPIC, results, wait_results, wait_until

__all__ = [
    "RESULT_TOPIC",
    "STATUS_TOPIC",
    "image_ids",
    "real_images",
    "results",
    "wait_results",
    "wait_until",
]


def real_images(count: int, suffix: str | None = None) -> list[Path]:
    """Distinct real X-ray files (PNG/JPEG) from ../shared/data/cxr, smallest first (quick to copy)."""
    rows = [r for r in data.rows(modality="X-ray") if r["file"].startswith("images/")]
    paths = [data.cxr_data() / r["file"] for r in rows]
    if suffix:
        paths = [p for p in paths if p.suffix == suffix]
    paths.sort(key=lambda p: (p.stat().st_size, p.name))
    assert len(paths) >= count
    return paths[:count]


def image_ids(payloads: list[dict[str, object]]) -> list[str]:
    return [str(p["image"]["image_id"]) for p in payloads]  # type: ignore[index]
