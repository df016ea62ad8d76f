"""Fixtures for the fault tests: a tiny real ONNX model, daemons that are always stopped, real images."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import data, tiny_models
from tests.support.daemon import DaemonProcess
from tests.support.mosquitto import Broker, Subscriber, unique_by_message_id

SITE, DEVICE = "ward-7", "cart-1"
RESULT_TOPIC = f"cxr/{SITE}/{DEVICE}/result"
STATUS_TOPIC = f"cxr/{SITE}/{DEVICE}/status"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_models.xrv_like(tmp_path / "model")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(broker: Broker | None, model: Path, **overrides: object) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / f"appliance{len(made)}", broker, model, **overrides)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def real_images(count: int, suffix: str | None = None) -> list[Path]:
    """Distinct real X-ray files (PNG/JPEG) from ../shared/data/cxr, smallest first (quick to copy)."""
    rows = [r for r in data.rows(modality="X-ray") if r["file"].startswith("images/")]
    paths = [data.cxr_data() / r["file"] for r in rows]
    if suffix:
        paths = [p for p in paths if p.suffix == suffix]
    paths.sort(key=lambda p: (p.stat().st_size, p.name))
    assert len(paths) >= count
    return paths[:count]


def results(sub: Subscriber) -> list[dict[str, object]]:
    return unique_by_message_id(sub.on_topic(RESULT_TOPIC))


def wait_results(sub: Subscriber, count: int, timeout: float) -> list[dict[str, object]]:
    sub.wait_for(lambda _msgs: len(results(sub)) >= count, timeout)
    return results(sub)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def image_ids(payloads: list[dict[str, object]]) -> list[str]:
    return [str(p["image"]["image_id"]) for p in payloads]  # type: ignore[index]
