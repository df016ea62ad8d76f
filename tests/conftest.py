"""Shared fixtures. The MQTT ones start a REAL Mosquitto (Debian's) on free loopback ports.

    def test_x(broker):                 # a plain broker, anonymous, with persistence
        with Subscriber(broker, "cxr/#") as sub: ...

    def test_y(broker_factory):         # anything else: auth, ACL, WebSockets, TLS
        b = broker_factory(users={"cart": "pw"}, acl="user cart\ntopic write cxr/#\n", websockets=True)

Every broker made here is stopped (SIGTERM, then SIGKILL) at the end of its test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from appliance.ingest.spool import Spool
from testsupport import tiny_models
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import MOSQUITTO, Broker, Subscriber

if TYPE_CHECKING:
    from appliance.pipeline import Analyzer


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.fail(f"{MOSQUITTO} not found: install Debian's mosquitto (apt-get install mosquitto)")
    return MOSQUITTO


@pytest.fixture
def broker_factory(mosquitto_bin: str, tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    made: list[Broker] = []

    def make(**options: Any) -> Broker:
        b = Broker(tmp_path / f"broker{len(made)}", **options)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


@pytest.fixture
def subscriber_factory(broker: Broker) -> Iterator[Callable[..., Subscriber]]:
    """Subscribers on the default `broker`, closed at the end; pass broker=... for another one."""
    made: list[Subscriber] = []

    def make(topics: str | list[str], **options: Any) -> Subscriber:
        target = options.pop("broker", broker)
        s = Subscriber(target, topics, **options)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A tiny real ONNX model (testsupport/tiny_models.py): fast, for daemon mechanics."""
    return tiny_models.xrv_like(tmp_path / "model")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start the real daemon (`cxr-appliance run`) as systemd would; every one is stopped at the end."""
    made: list[DaemonProcess] = []

    def make(broker: Broker | None, model: Path, **overrides: object) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / f"appliance{len(made)}", broker, model, **overrides)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    """A real spool in the test's folder (ingest, receiver, USB import and intake tests share it)."""
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


@pytest.fixture
def analyzer(tmp_path: Path) -> Analyzer:
    """A real Analyzer around the tiny ONNX model on ONNX Runtime (the feeder's tests)."""
    from appliance.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
    from appliance.config import AppConfig
    from appliance.manifest import Precision, load_manifest
    from appliance.pipeline import Analyzer

    manifest = load_manifest(tiny_models.xrv_like(tmp_path / "xrv"))
    backend = OnnxRuntimeBackend(manifest, Precision.fp32, OnnxRuntimeConfig(intra_op_threads=1), max_batch=2)
    return Analyzer(AppConfig(), manifest, backend)
