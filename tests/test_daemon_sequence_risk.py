"""The daemon with the bundled model and an enabled sequence risk: a patient's second image gets a
risk "using earlier images" (real Mosquitto, real DICOM, real ONNX Runtime)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from testsupport import data
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Received, Subscriber, unique_by_message_id

RESULT_TOPIC = "cxr/ward-7/cart-1/result"
BUNDLED = Path(__file__).resolve().parent.parent / "engines" / "cxr-lite0"
# Whatever the ship decision of the trained model, this test enables a known one: risk rises with the
# change since the prior.
CHANGE_MODEL = {
    "enabled": True,
    "features": ["risk_logit", "risk_logit_change"],
    "mean": [0.0, 0.0],
    "scale": [1.0, 1.0],
    "coefficients": [1.0, 1.0],
    "intercept": 0.0,
    "threshold": 0.5,
}


def results_at_least(count: int) -> Callable[[list[Received]], bool]:
    return lambda msgs: len(unique_by_message_id(m for m in msgs if m.topic == RESULT_TOPIC)) >= count


@pytest.fixture
def model(tmp_path: Path) -> Path:
    if not (BUNDLED / "manifest.yaml").is_file():
        pytest.skip("engines/cxr-lite0 is not built")
    folder = tmp_path / "model"
    folder.mkdir()
    content = yaml.safe_load((BUNDLED / "manifest.yaml").read_text())
    content["onnx"] = {"fp32": content["onnx"]["fp32"]}
    content["sequence_risk"] = CHANGE_MODEL
    # This test is about the sequence mechanics on any real image, not about when risk is read: the
    # shipped decision table reads risk only with COVID-19/pneumonia named (docs/reading.md, S1).
    content["triage"]["measures_require"] = []
    for output in content["outputs"]:
        if output["role"] == "risk":
            output["published"] = output["labels"]
    (folder / "manifest.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
    (folder / content["onnx"]["fp32"]["file"]).symlink_to(BUNDLED / content["onnx"]["fp32"]["file"])
    return folder


@pytest.fixture
def daemon(tmp_path: Path, broker: Broker, model: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "appliance", broker, model)
    yield process
    process.stop()


def test_second_image_of_a_patient_gets_the_sequence_risk(
    broker: Broker, daemon: DaemonProcess, tmp_path: Path
) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    source = data.real_dicoms()[1]
    for name, day in (("day1.dcm", "20260301"), ("day2.dcm", "20260302")):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AcquisitionDate, ds.AcquisitionTime = day, "083000"
        ds.save_as(tmp_path / name)
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        got: list[dict[str, object]] = []
        for count, name in enumerate(("day1.dcm", "day2.dcm"), start=1):
            shutil.copyfile(tmp_path / name, daemon.inbox / name)
            sub.wait_for(results_at_least(count), 60)
            got = unique_by_message_id(sub.on_topic(RESULT_TOPIC))
    day1, day2 = got
    assert day1["status"] == day2["status"] == "ok", day1.get("reason")
    risk1, risk2 = day1["risk"], day2["risk"]
    assert isinstance(risk1, dict) and isinstance(risk2, dict)
    assert risk1["method"] == "single-image" and risk2["method"] == "sequence"
    # Same pixels a day apart: no change, so the sequence risk is the sigmoid of the image's own logit.
    assert risk2["single_image_score"] == pytest.approx(risk1["score"], abs=1e-4)
    assert risk2["score"] == pytest.approx(risk1["score"], abs=2e-4)
    assert "using earlier images" in str(day2["text"]) and "using earlier images" not in str(day1["text"])
    assert isinstance(day2["trend"], dict) and day2["trend"]["risk_now"] == risk2["score"]
