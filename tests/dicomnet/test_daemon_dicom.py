"""End to end: the X-ray unit C-STOREs a real DICOM to the running daemon, the result comes out on MQTT,
and the SR + heatmap SC reach the PACS. Real Mosquitto, real ONNX Runtime, real pynetdicom on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from appliance.dicomnet.receiver import SUCCESS
from tests.dicomnet.pacs import Pacs
from testsupport import dicom_scu, tiny_models
from testsupport.daemon import REPO, DaemonProcess
from testsupport.data import real_dicoms
from testsupport.mosquitto import LOOPBACK, Broker, Subscriber, free_port, unique_by_message_id
from testsupport.schemas import assert_valid

RESULT_TOPIC = "cxr/ward-7/cart-1/result"

pytestmark = pytest.mark.skipif(
    "DicomReceiver" not in (REPO / "appliance" / "daemon.py").read_text(encoding="utf-8"),
    reason="appliance/daemon.py does not start the DICOM receiver yet",
)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    p = Pacs(tmp_path / "pacs").start()
    yield p
    p.stop()


def test_c_store_to_the_cart_gives_a_result_on_mqtt_and_sr_sc_on_the_pacs(
    broker: Broker, pacs: Pacs, tmp_path: Path
) -> None:
    port = free_port()
    daemon = DaemonProcess(
        tmp_path / "appliance",
        broker,
        tiny_models.xrv_like(tmp_path / "model"),
        dicom_net={"enabled": True, "bind": LOOPBACK, "port": port, "allowed_calling_ae": ["XRAY_UNIT"]},
        dicom_out={
            "enabled": True,
            "outbox": str(tmp_path / "dicom-out"),
            "pacs": {
                "ae_title": pacs.ae_title,
                "host": LOOPBACK,
                "port": pacs.port,
                "retry_min_seconds": 0.5,
            },
        },
    )
    sent = real_dicoms()[:2]
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        try:
            assert dicom_scu.echo(port) == SUCCESS
            assert dicom_scu.store(port, sent, calling="STRANGER") == []
            started = time.perf_counter()
            assert dicom_scu.store(port, sent) == [SUCCESS, SUCCESS]
            assert sub.wait_for(
                lambda msgs: len(unique_by_message_id(m for m in msgs if m.topic == RESULT_TOPIC)) >= 2, 60
            ), daemon.log()
            print(f"2 C-STOREs -> 2 results on MQTT: {(time.perf_counter() - started) * 1000:.0f} ms")
            results = unique_by_message_id(sub.on_topic(RESULT_TOPIC))
            for payload in results:
                assert_valid(payload, "result.v2.json")
                assert payload["image"]["source"] == "dicom-net" and payload["status"] == "ok"
            deadline = time.monotonic() + 30
            while len(pacs.received()) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            assert daemon.stop() == 0
    received = [pydicom.dcmread(p) for p in pacs.received()]
    assert sorted(ds.Modality for ds in received) == ["OT", "OT", "SR", "SR"], daemon.log()
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sent}
    referenced = {
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in received if ds.Modality == "OT"
    }
    assert referenced == sources
    assert "'STRANGER' is not in dicom_net.allowed_calling_ae" in daemon.log()


def test_a_cart_whose_receiver_cannot_listen_never_says_online(broker: Broker, tmp_path: Path) -> None:
    """Every part starts before the ward hears `online`: a start that fails leaves no online status
    (before, `online` was published, then the broker's will said `offline`)."""
    import socket

    taken = socket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen()
    daemon = DaemonProcess(
        tmp_path / "appliance",
        broker,
        tiny_models.xrv_like(tmp_path / "model"),
        dicom_net={
            "enabled": True,
            "bind": LOOPBACK,
            "port": taken.getsockname()[1],
            "allowed_calling_ae": ["XRAY_UNIT"],
        },
    )
    with Subscriber(broker, "cxr/#") as sub, taken:
        with pytest.raises(AssertionError, match="never said READY"):
            daemon.start(timeout=60)
        assert daemon.proc is not None and daemon.proc.wait(10) == 2
        time.sleep(1.0)  # a will or a late status would have arrived by now
    assert "cannot listen" in daemon.log()
    states = [m.json().get("state") for m in sub.on_topic("cxr/ward-7/cart-1/status")]
    assert "online" not in states, states
