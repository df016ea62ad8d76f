"""The daemon end to end: real Mosquitto, real files, real ONNX Runtime, kill -9 and broker outages.

Files arrive the three ways they do on a cart (cp, rsync's temp-then-rename, a slow writer); every
image yields exactly one result (after de-duplication by message id), schema-valid, none lost.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testsupport import data, tiny_models
from testsupport.daemon import REPO, RESULT_TOPIC, DaemonProcess, wait_results, wait_until
from testsupport.mosquitto import Broker, Subscriber, unique_by_message_id
from testsupport.schemas import assert_valid

# Copies into the inbox use shutil.copyfile, not shutil.copy: copy() chmods the file after closing it,
# and by then the daemon may already have moved it (a real race, not a daemon bug).


def real_images(count: int) -> list[Path]:
    """Distinct real frontal X-rays (JPEG/PNG) plus the real DICOMs, from ../shared/data/cxr."""
    rows = [
        r
        for r in data.rows(modality="X-ray")
        if r["file"].startswith("images/") and r["view"] in {"PA", "AP"}
    ]
    pngs = [data.cxr_data() / r["file"] for r in rows[: max(0, count - 2)]]
    return [*data.real_dicoms()[:2], *pngs][:count]


def frontal_with_suffix(suffix: str) -> Path:
    rows = [r for r in data.rows(modality="X-ray", view="PA") if r["file"].endswith(suffix)]
    return data.cxr_data() / rows[0]["file"]


def slow_copy(source: Path, target: Path, chunks: int = 5, pause: float = 0.4) -> None:
    payload = source.read_bytes()
    step = len(payload) // chunks + 1
    with target.open("wb") as handle:
        for start in range(0, len(payload), step):
            handle.write(payload[start : start + step])
            handle.flush()
            time.sleep(pause)


def rsync_copy(source: Path, target: Path) -> None:
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-q", str(source), str(target)], check=True)
    else:  # what rsync does: write a hidden temp name, then rename into place
        temp = target.with_name(f".{target.name}.Xa9Q2")
        shutil.copyfile(source, temp)
        temp.rename(target)


def test_three_copy_styles_and_a_duplicate_give_one_result_each(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    usb = tmp_path / "usb"
    usb.mkdir()
    daemon = daemons(broker, model, ingest={"extra_watch": [str(usb)]})
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        dicom, png, jpg = data.real_dicoms()[0], frontal_with_suffix(".png"), frontal_with_suffix(".jpg")
        shutil.copyfile(dicom, daemon.inbox / "cp.dcm")  # cp: close-write
        rsync_copy(png, daemon.inbox / "rsync.png")
        writer = threading.Thread(target=slow_copy, args=(jpg, daemon.inbox / "slow.jpg"))
        writer.start()
        shutil.copyfile(dicom, usb / "again-from-usb.dcm")  # the same SOPInstanceUID from a second folder
        writer.join()
        got = wait_results(sub, 3, timeout=30)
        time.sleep(2.0)  # a duplicate would have arrived by now
        got = unique_by_message_id(sub.on_topic(RESULT_TOPIC))
    assert len(got) == 3, daemon.log()
    assert len(sub.on_topic(RESULT_TOPIC)) == 3, "a result was published twice"
    for payload in got:
        assert_valid(payload, "result.v2.json")
        assert payload["status"] == "ok", payload
        assert payload["disclaimer"] == "Not for diagnostic use"
    assert sorted(str(p["image"]["format"]) for p in got) == ["dicom", "jpeg", "png"]
    assert len(daemon.spool_files("done")) == 3
    status = [m.json() for m in sub.on_topic("cxr/ward-7/cart-1/status")]
    assert status and status[-1]["state"] == "online"
    assert "WATCHDOG=1" in daemon.notifications  # pinged from the processing loop
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.notifications


def test_no_patient_name_or_id_in_any_payload(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    import pydicom

    dicom = data.real_dicoms()[1]
    ds = pydicom.dcmread(dicom, stop_before_pixels=True)
    secrets = [str(ds.PatientID), str(ds.PatientName)]
    daemon = daemons(broker, model, dicom_out={"enabled": True, "outbox": str(model.parent / "dicom-out")})
    # Named as exports often are: the file name is the patient's too (found by a review run in the log).
    name = f"{secrets[1].replace('^', '_')}_{secrets[0]}_chest.dcm"
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        shutil.copyfile(dicom, daemon.inbox / name)
        got = wait_results(sub, 1, timeout=20)
        everything = b"\n".join(m.payload for m in sub.messages)
    assert got and got[0]["patient_key"], "a pseudonymous key is expected for a DICOM with a patient ID"
    assert wait_until(lambda: any((model.parent / "dicom-out").glob("*.sr.dcm")), 20)
    daemon.stop()
    for secret in secrets:
        assert secret and secret.encode() not in everything, f"{secret!r} leaked into an MQTT payload"
        assert secret not in daemon.log(), f"{secret!r} in the daemon's log at the default level"


def test_bad_files_are_quarantined_with_a_reason_and_the_rest_still_run(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        (daemon.inbox / "empty.dcm").write_bytes(b"")
        (daemon.inbox / "notes.dcm").write_text("not an image\n" * 20)
        truncated = data.real_dicoms()[1].read_bytes()
        (daemon.inbox / "truncated.dcm").write_bytes(truncated[: len(truncated) // 2])
        (daemon.inbox / "a-folder.dcm").mkdir()
        (daemon.inbox / "loop.dcm").symlink_to(daemon.inbox / "loop.dcm")
        shutil.copyfile(data.real_dicoms()[0], daemon.inbox / "good.dcm")
        got = wait_results(sub, 1, timeout=20)
        deadline = time.monotonic() + 90  # the truncated one waits for completion, then times out
        while (
            time.monotonic() < deadline and len(list((daemon.spool / "quarantine").glob("*.reason.txt"))) < 3
        ):
            time.sleep(0.5)
    assert any(p["status"] == "ok" for p in got)
    reasons = [p.read_text() for p in (daemon.spool / "quarantine").glob("*.reason.txt")]
    assert len(reasons) >= 3, daemon.log()
    joined = "\n".join(reasons)
    for expected in ("empty", "notes.dcm"):
        assert expected in joined, joined
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died on bad input"


def test_broker_outage_loses_nothing(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    images = real_images(10)
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/+/+/result", client_id="ward-display-test") as sub:
        daemon.start()
        for index, image in enumerate(images[:5]):
            shutil.copyfile(image, daemon.inbox / f"a{index}{image.suffix}")
        wait_results(sub, 5, timeout=30)
        broker.kill()  # SIGKILL: the broker vanishes without a goodbye
        for index, image in enumerate(images[5:]):
            shutil.copyfile(image, daemon.inbox / f"b{index}{image.suffix}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(daemon.spool_files("done")) < 10:
            time.sleep(0.3)
        assert len(daemon.spool_files("done")) == 10, "images must be processed while the broker is down"
        broker.start()
        got = wait_results(sub, 10, timeout=60)
    assert len(got) == 10, f"{len(got)} of 10 results arrived\n{daemon.log()}"
    assert len({p["image"]["image_id"] for p in got}) == 10
    assert all(p["status"] == "ok" for p in got)


def test_kill_9_mid_run_loses_nothing_and_publishes_each_image_once(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    images = real_images(12)
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/+/+/result", client_id="ward-display-kill") as sub:
        daemon.start()
        for index, image in enumerate(images):
            shutil.copyfile(image, daemon.inbox / f"k{index}{image.suffix}")
        sub.wait_for(lambda msgs: len(msgs) >= 3, timeout=30)
        daemon.kill()
        daemon.start()
        got = wait_results(sub, 12, timeout=60)
        time.sleep(1.5)
        raw = [m.json()["message_id"] for m in sub.on_topic(RESULT_TOPIC)]
    assert len(got) == 12, f"{len(got)} of 12 results after kill -9\n{daemon.log()}"
    per_image: dict[str, set[str]] = {}
    for payload in got:
        per_image.setdefault(str(payload["image"]["image_id"]), set()).add(str(payload["message_id"]))
    assert len(per_image) == 12 and all(len(ids) == 1 for ids in per_image.values())
    # At-least-once delivery may repeat a message whose PUBACK was lost in the kill; the id makes it harmless.
    assert len(raw) - len(set(raw)) <= 4
    assert len(daemon.spool_files("done")) == 12
    assert not daemon.spool_files("processing")


def test_a_second_image_of_the_same_patient_links_to_the_prior(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    first = data.real_dicoms()[1]
    later = pydicom.dcmread(first)
    later.SOPInstanceUID = generate_uid()
    later.file_meta.MediaStorageSOPInstanceUID = later.SOPInstanceUID
    later.AcquisitionDate, later.AcquisitionTime = "20260302", "083000"
    earlier = pydicom.dcmread(first)
    earlier.AcquisitionDate, earlier.AcquisitionTime = "20260301", "083000"
    earlier.save_as(tmp_path / "day1.dcm")
    later.save_as(tmp_path / "day2.dcm")
    daemon = daemons(broker, model)
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        shutil.copyfile(tmp_path / "day1.dcm", daemon.inbox / "day1.dcm")
        wait_results(sub, 1, timeout=20)
        shutil.copyfile(tmp_path / "day2.dcm", daemon.inbox / "day2.dcm")
        got = wait_results(sub, 2, timeout=20)
    assert len(got) == 2
    day1, day2 = got
    assert day1["trend"] is None and day1["patient_key"] == day2["patient_key"]
    assert day2["trend"]["prior_image_id"] == day1["image"]["image_id"]
    assert day2["trend"]["interval_hours"] == 24.0


def test_a_file_over_max_file_mb_is_quarantined_unread(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    big = data.real_dicoms()[1]  # 1 MB
    daemon = daemons(broker, model, ingest={"max_file_mb": 0.5})
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        shutil.copyfile(big, daemon.inbox / "big.dcm")
        shutil.copyfile(data.real_dicoms()[0], daemon.inbox / "small.dcm")  # 0.13 MB: read as usual
        got = wait_results(sub, 1, timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not list((daemon.spool / "quarantine").glob("*.reason.txt")):
            time.sleep(0.2)
    reasons = [p.read_text() for p in (daemon.spool / "quarantine").glob("*.reason.txt")]
    assert len(reasons) == 1 and "file too large" in reasons[0] and "big.dcm" in reasons[0], reasons
    assert len(got) == 1 and got[0]["status"] == "ok"
    assert not (daemon.inbox / "big.dcm").exists()


def test_an_image_that_keeps_killing_the_daemon_is_refused_not_retried_forever(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    from appliance.ingest.spool import Spool
    from appliance.ingest.spool_records import Accepted

    daemon = daemons(broker, model)
    daemon.inbox.mkdir(parents=True)
    staged = daemon.workdir / "poison.dcm"
    shutil.copyfile(data.real_dicoms()[0], staged)
    spool = Spool(daemon.spool)
    accepted = spool.accept(staged, "inbox")
    assert isinstance(accepted, Accepted)
    for _ in range(3):  # three times the process died while this image was in processing/
        assert [i.image_id for i in spool.claim(1)] == [accepted.image_id]
        spool.recover()
    assert spool.crashes(accepted.image_id) == 3
    spool.close()
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        got = wait_results(sub, 1, timeout=20)
    assert got[0]["status"] == "error" and got[0]["reason"] == "crashed the reader"
    assert wait_until(lambda: any((daemon.spool / "quarantine").glob("*.reason.txt")), 10)
    reasons = [p.read_text() for p in (daemon.spool / "quarantine").glob("*.reason.txt")]
    assert len(reasons) == 1 and "crashed the reader" in reasons[0]


def test_an_unexpected_error_in_the_stages_refuses_that_image_and_the_daemon_goes_on(
    broker: Broker, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    import yaml

    # A manifest that names two labels for a three-column output: interpretation fails on every image.
    manifest_path = tiny_models.xrv_like(tmp_path / "broken")
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["outputs"][0]["labels"] = ["Atelectasis", "Effusion"]
    manifest["outputs"][0]["thresholds"] = {"Atelectasis": 0.5}
    manifest_path.write_text(yaml.safe_dump(manifest))
    daemon = daemons(broker, manifest_path, inference={"max_batch": 2})
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        for index, image in enumerate(real_images(3)):
            shutil.copyfile(image, daemon.inbox / f"e{index}{image.suffix}")
        got = wait_results(sub, 3, timeout=30)
    assert [p["status"] for p in got] == ["error"] * 3 and {p["reason"] for p in got} == {"internal error"}
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon must keep running"
    assert "internal error" in daemon.log() and "Traceback" in daemon.log()
    # the file moves to quarantine just after its result is handed to MQTT
    assert wait_until(lambda: len(list((daemon.spool / "quarantine").glob("*.reason.txt"))) == 3, 10)


def test_an_exception_in_the_dicom_outputs_counts_against_the_image_not_the_cart(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """Hardening II, High 1: a DICOM whose SOP Class UID no dictionary knows reads fine, but building its
    SR/SC raised past the writer and stopped the daemon, and the restart re-ran the hand-off forever.
    Now the exception counts against that image, which is quarantined with the reason at the limit."""
    import pydicom

    daemon = daemons(broker, model, dicom_out={"enabled": True, "outbox": str(model.parent / "dicom-out")})
    odd = pydicom.dcmread(data.real_dicoms()[0])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(
        "1.2.826.0.1.3680043.10.1.999.1"
    )
    staged = daemon.workdir / "odd.dcm"
    odd.save_as(staged)
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        shutil.copyfile(staged, daemon.inbox / "odd.dcm")
        assert wait_until(lambda: any((daemon.spool / "quarantine").glob("*.reason.txt")), 60)
        shutil.copyfile(data.real_dicoms()[1], daemon.inbox / "next.dcm")
        got = wait_results(sub, 2, timeout=60)
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon must keep running"
    reasons = [p.read_text() for p in (daemon.spool / "quarantine").glob("*.reason.txt")]
    assert len(reasons) == 1 and "internal error" in reasons[0] and "failed 3 times" in reasons[0], reasons
    assert "odd.dcm" in reasons[0]
    failures = [
        line for line in daemon.log().splitlines() if "ERROR" in line and "hand-off: KeyError" in line
    ]
    assert len(failures) == 3, failures  # tried three times, then refused
    # The next image is read and its DICOM outputs written as usual (just after its MQTT result).
    assert {r["status"] for r in got} == {"ok"}
    assert wait_until(lambda: len(list((model.parent / "dicom-out").glob("*.sr.dcm"))) == 1, 10)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_the_bundled_int8_and_fp16_models_run_end_to_end_through_the_daemon(
    broker: Broker, daemons: Callable[..., DaemonProcess], precision: str
) -> None:
    """inference.precision selects the manifest's gated file; its sha256 is named in every result."""
    import yaml

    bundled = REPO / "engines" / "cxr-lite0" / "manifest.yaml"
    listed = yaml.safe_load(bundled.read_text())["onnx"][precision]
    daemon = daemons(broker, bundled, inference={"precision": precision, "max_batch": 2})
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start(timeout=120)
        for index, image in enumerate(real_images(3)):
            shutil.copyfile(image, daemon.inbox / f"p{index}{image.suffix}")
        got = wait_results(sub, 3, timeout=60)
    for payload in got:
        assert_valid(payload, "result.v2.json")
        assert payload["provenance"]["precision"] == precision
        assert payload["provenance"]["onnx_sha256"] == listed["sha256"]
        assert payload["provenance"]["backend"] == "onnxruntime"
    assert [p["status"] for p in got].count("ok") >= 2  # real frontal X-rays are read, not refused


def test_a_claim_that_fails_sets_the_storage_fault_and_the_loop_tries_again(
    broker: Broker,
    model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Claiming from the spool can fail (a full disk fails the database's commit): the loop treats it as
    it treats a failing hand-off, a storage fault and a retry, instead of stopping the daemon, and the
    next claim that works clears the fault even with nothing to claim (the intake takes nothing while it
    is set). In process: the failure is injected into the spool's claim."""
    import sqlite3

    from appliance import daemon as daemon_module
    from appliance.config import load_config

    monkeypatch.setattr(daemon_module, "RETRY_SECONDS", 0.2)
    files = DaemonProcess(tmp_path / "appliance", broker, model)  # only its config.yaml and folders
    daemon = daemon_module.Daemon(load_config(files.config_path))
    daemon._start()
    faults: list[str | None] = []
    set_fault = daemon._set_fault

    def recorded(kind: str, why: str | None) -> None:
        faults.append(why)
        set_fault(kind, why)

    monkeypatch.setattr(daemon, "_set_fault", recorded)
    claim = daemon.spool.claim
    failing = [sqlite3.OperationalError("database or disk is full")]

    def claim_once_failing(n: int = 1) -> object:
        if failing:
            raise failing.pop()
        return claim(n)

    monkeypatch.setattr(daemon.spool, "claim", claim_once_failing)
    loop = threading.Thread(target=daemon._loop)
    try:
        with Subscriber(broker, RESULT_TOPIC) as sub:
            loop.start()
            # Cleared by the next claim that works, with nothing to claim: the image comes only then.
            assert wait_until(lambda: len(faults) == 2, 10), faults
            assert faults == ["cannot claim images: database or disk is full", None]
            shutil.copyfile(real_images(1)[0], files.inbox / "first.jpg")
            got = wait_results(sub, 1, timeout=30)
    finally:
        daemon.stop_event.set()
        daemon.wake.set()
        loop.join(30)
        daemon._shutdown()
    assert not loop.is_alive() and [r["status"] for r in got] == ["ok"]
    assert not failing and not daemon._faults
    assert "storage problem (database or disk is full)" in caplog.text
    assert list((files.spool / "done").iterdir()) and not list((files.spool / "processing").iterdir())


def test_a_broker_that_cannot_be_reached_is_said_in_the_log(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess]
) -> None:
    """Found by a review run: with nothing listening on the broker's port the log said nothing at all
    (a refused connect calls neither on_connect nor on_disconnect)."""
    from testsupport.mosquitto import free_port

    daemon = daemons(broker, model, mqtt={"port": free_port()})
    daemon.start()
    assert wait_until(lambda: "not reachable; retrying" in daemon.log(), 20), daemon.log()
    assert daemon.log().count("not reachable; retrying") == 1  # one line per outage, not per attempt
