"""What identifies a patient never leaves the cart in clear: the real daemon, real Mosquitto, real DICOMs.

A free-text Current Patient Location ("Ward7 Bed3 (Jane Doe)") is replaced by the cart's bed unless
the site listed it; the published image id is keyed with the site's secret, so nobody holding the
image (or its UID from the PACS) can compute it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from appliance.ingest.identity import dicom_uid, uid_key
from appliance.pseudonym import PatientKeys
from testsupport import data
from testsupport.daemon import RESULT_TOPIC, DaemonProcess, wait_results
from testsupport.mosquitto import Broker, Subscriber

NAME = "Jane Doe"


def with_location(source: Path, location: str, dest: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.CurrentPatientLocation = location
    ds.save_as(dest)
    return dest


def test_unlisted_locations_are_never_published_and_image_ids_are_keyed(
    broker: Broker, model: Path, daemons: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    daemon = daemons(broker, model, device={"locations": {"Ward7 Bed4": "bed-4"}})
    first, second = data.real_dicoms()[:2]
    unlisted = with_location(first, f"Ward7 Bed3 ({NAME})", tmp_path / "unlisted.dcm")
    listed = with_location(second, "ward7  bed4", tmp_path / "listed.dcm")  # case and spacing differ
    # The spool's keys: the first file of each SOP Instance UID is keyed by the UID alone.
    keys = {uid_key(str(dicom_uid(p))): p.name for p in (unlisted, listed)}
    with Subscriber(broker, "cxr/#") as sub:
        daemon.start()
        for path in (unlisted, listed):
            (daemon.inbox / path.name).write_bytes(path.read_bytes())
        got = wait_results(sub, 2, timeout=60)
        time.sleep(1.0)  # the retained latest/ and thumbnail/ messages follow the result
        messages = list(sub.messages)
    assert daemon.stop() == 0
    assert len(got) == 2, daemon.log()

    # Locations: the listed one mapped, the unlisted one replaced by the cart's bed, nowhere in clear.
    assert sorted(r["location"] for r in got) == ["bed-3", "bed-4"]
    assert {m.topic for m in messages if "/latest/" in m.topic} == {
        RESULT_TOPIC.replace("result", "latest/bed-3"),
        RESULT_TOPIC.replace("result", "latest/bed-4"),
    }
    for m in messages:
        assert b"Jane" not in m.payload and "Jane" not in m.topic, m.topic
    log = daemon.log()
    assert "Jane" not in log and "DICOM location not in device.locations" in log
    stored = b"".join(p.read_bytes() for p in daemon.workdir.glob("journal.sqlite3*"))
    assert b"Jane" not in stored

    # Image ids: HMAC under the key derived from the site salt, not a plain hash of the key.
    secret = PatientKeys((daemon.workdir / "salt").read_bytes()).image_id_secret()
    published = {r["image"]["image_id"] for r in got}
    assert published == {hmac.new(secret, k.encode(), hashlib.sha256).hexdigest() for k in keys}
    assert not published & {hashlib.sha256(k.encode()).hexdigest() for k in keys}
