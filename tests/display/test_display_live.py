"""The ward display fed by the REAL appliance: `cxr-appliance run` on the bundled cxr-lite0 model reads
real images from ../shared/data/cxr, publishes to a real Mosquitto (WebSockets, passwords, the product's
ACL shape), and headless Chromium shows what it published. One ward shift as one scenario: results,
a second X-ray of the same patient, an acknowledgement that lands in the cart's journal, the cart
killed and restarted, a refused lateral, and a 1080p screenshot of the result.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from appliance.journal import Journal
from tests.display.acknowledge import acknowledge
from tests.display.browser import Browser, Page
from tests.display.conftest import ARTIFACTS, serve_display, ward_broker
from tests.display.results import key_sentence
from testsupport import data
from testsupport.daemon import DaemonProcess
from testsupport.mosquitto import Broker, Subscriber, unique_by_message_id
from testsupport.schemas import assert_valid

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "engines" / "cxr-lite0" / "manifest.yaml"
SITE, DEVICE = "ward7", "cart-1"
CART_AUTH = (DEVICE, "cart-live-secret")
DISPLAY_AUTH = ("display-live", "display-live-secret")
RESULT_TOPIC = f"cxr/{SITE}/{DEVICE}/result"
CART_KEY = f"{SITE}/{DEVICE}"
WORD = {
    "urgent": "URGENT",
    "abnormal": "ABNORMAL",
    "normal": "NORMAL",
    "refused": "REFUSED",
    "error": "ERROR",
}
RESULT_TIMEOUT = 90.0  # two busy CPU cores: model start-up plus a few inferences


@dataclass
class LiveWard:
    broker: Broker
    daemon: DaemonProcess
    url: str
    results: Subscriber  # what the daemon really published, read with the display's own account

    def published(self) -> list[dict[str, Any]]:
        return unique_by_message_id(self.results.on_topic(RESULT_TOPIC))

    def drop(self, source: Path, name: str) -> dict[str, Any]:
        """Copy an image into the daemon's inbox and return the one new result it publishes for it."""
        before = len(self.published())
        staged = self.daemon.workdir / f".staging-{name}"
        shutil.copyfile(source, staged)
        staged.rename(self.daemon.inbox / name)  # appears whole, as a well-behaved modality writes it
        arrived = self.results.wait_for(lambda _: len(self.published()) > before, RESULT_TIMEOUT)
        assert arrived, f"no result for {name} within {RESULT_TIMEOUT} s; daemon log:\n{self.daemon.log()}"
        new = self.published()[before:]
        assert len(new) == 1, new
        assert_valid(new[0], "result.v2.json")
        return new[0]

    def move_cart(self, location: str) -> None:
        """The cart is wheeled to another bay while it is down: its default bed changes."""
        config = yaml.safe_load(self.daemon.config_path.read_text(encoding="utf-8"))
        config["device"]["location"] = location
        self.daemon.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")


@pytest.fixture
def live(broker_factory: Callable[..., Broker], tmp_path: Path) -> Iterator[LiveWard]:
    with live_ward(broker_factory, tmp_path) as ward:
        yield ward


@contextmanager
def live_ward(broker_factory: Callable[..., Broker], tmp_path: Path) -> Iterator[LiveWard]:
    """The daemon, its broker and one display page (tests/display/test_feedback_live.py reuses it)."""
    if not MODEL.is_file():
        pytest.fail(f"bundled model {MODEL} missing: the live display test runs the real appliance on it")
    # The product's files: the cart owns its prefix (cxr.acl.example), the display its `display-account` block.
    broker = ward_broker(
        broker_factory, tmp_path / "mosquitto-files", CART_AUTH, f"cxr/{SITE}/{DEVICE}/#", DISPLAY_AUTH
    )
    secret = tmp_path / "mqtt-password"
    secret.write_text(CART_AUTH[1] + "\n", encoding="utf-8")
    secret.chmod(0o600)
    daemon = DaemonProcess(
        tmp_path / "appliance",
        broker,
        MODEL,
        device={
            "site": SITE,
            "device_id": DEVICE,
            "location": "Bay 2 Bed 1",
            # The ward's beds: a DICOM location not listed here never reaches a topic or payload.
            "locations": {bed: bed for bed in ("Bay 1 Bed 1", "Bay 1 Bed 2", "Bay 2 Bed 1")},
        },
        mqtt={"username": CART_AUTH[0], "password_file": str(secret)},
    )
    results = Subscriber(
        broker, RESULT_TOPIC, clean_session=True, username=DISPLAY_AUTH[0], password=DISPLAY_AUTH[1]
    )
    try:
        with serve_display(broker, "ward7-live", DISPLAY_AUTH) as url:
            daemon.start()
            yield LiveWard(broker, daemon, url, results)
    finally:
        results.close()
        daemon.stop()


def restamped(source: Path, target: Path, *, acquired: datetime, location: str, new_instance: bool) -> Path:
    """A real DICOM with its pixels untouched and a new acquisition time and bed (and optionally a new
    SOPInstanceUID: a second X-ray of the same patient, since the patient ID stays)."""
    ds = pydicom.dcmread(source)
    if new_instance:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AcquisitionDate = acquired.strftime("%Y%m%d")
    ds.AcquisitionTime = acquired.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = "+0000"  # times are UTC: the page's "min ago" must not depend on TZ
    ds.CurrentPatientLocation = location
    ds.save_as(target)
    return target


def first_image(**where: str) -> Path:
    rows = [r for r in data.rows(**where) if r["file"].startswith("images/")]
    assert rows, f"no image in ../shared/data/cxr/metadata.csv with {where}"
    return data.cxr_data() / rows[0]["file"]


def tile(bed: str) -> str:
    return f'.tile[data-bed="{bed}"]'


def chart_points(page: Page, bed: str) -> str | None:
    return page.attr(f"{tile(bed)} svg.trend-chart", "data-points")


def plotted(*results: dict[str, Any]) -> dict[str, set[str]]:
    """Images the trend chart can draw, per series: only those that published the value (the page never
    plots a value that is not in a result), from each result and the prior carried in its trend block."""
    series: dict[str, set[str]] = {"extent": set(), "risk": set()}
    for r in results:
        if (r.get("severity") or {}).get("extent") is not None:
            series["extent"].add(r["image"]["image_id"])
        if (r.get("risk") or {}).get("score") is not None:
            series["risk"].add(r["image"]["image_id"])
        trend = r.get("trend") or {}
        if trend.get("extent_before") is not None:
            series["extent"].add(trend["prior_image_id"])
        if trend.get("risk_before") is not None:
            series["risk"].add(trend["prior_image_id"])
    return series


def points(*results: dict[str, Any]) -> str | None:
    """The chart's data-points for these results; None: nothing to plot, so no chart at all."""
    series = plotted(*results)
    n = len(series["extent"] | series["risk"])
    return str(n) if n else None


def ackable(result: dict[str, Any]) -> bool:
    return result["status"] == "ok" and result["triage"] in ("urgent", "abnormal")


def assert_tile_shows(page: Page, result: dict[str, Any]) -> None:
    """The tile for the result's bed shows exactly that result: id, triage colour/word, key sentence;
    its detail view shows the whole published text."""
    bed = result["location"]
    page.wait(f'{tile(bed)}[data-message-id="{result["message_id"]}"]', timeout=20)
    level = result["triage"] if result["status"] == "ok" else result["status"]
    assert page.attr(tile(bed), "data-triage") == level
    assert page.text(f"{tile(bed)} .triage-word") == WORD[level]
    assert page.text(f"{tile(bed)} .key") == key_sentence(result)
    assert "Not for diagnostic use" in page.text(f"{tile(bed)} .ndu")
    page.click(f"{tile(bed)} .key")
    page.wait(f'#detail[open][data-message-id="{result["message_id"]}"]')
    assert page.text("#detail .detail-text") == result["text"]
    page.press("Escape")
    page.wait("#detail", state="hidden")


def test_display_shows_what_the_real_appliance_publishes(
    browser: Browser, live: LiveWard, tmp_path: Path
) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    page = browser.page("live", live.url)
    page.wait("#conn[data-state=online]")
    page.wait(f'.cart-chip[data-cart="{CART_KEY}"][data-state=online]', timeout=30)

    # 1. A real frontal CR DICOM (SIIM, via torchxrayvision), taken yesterday in Bay 1 Bed 1.
    dicom = data.cxr_data() / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    day1 = live.drop(
        restamped(
            dicom,
            tmp_path / "day1.dcm",
            acquired=now - timedelta(hours=20),
            location="Bay 1 Bed 1",
            new_instance=False,
        ),
        "day1.dcm",
    )
    assert day1["status"] == "ok" and day1["location"] == "Bay 1 Bed 1" and day1["patient_key"], day1
    assert_tile_shows(page, day1)
    assert chart_points(page, "Bay 1 Bed 1") == points(day1)
    # A heatmap published by the daemon is shown coloured on the tile.
    if day1.get("heatmap"):
        page.wait(f"{tile('Bay 1 Bed 1')} .heatmap img")

    # A real frontal photo-export (JPEG/PNG, no DICOM tags): lands on the cart's default bed.
    frontal = first_image(source="actualmed", finding="No Finding", view="PA")
    jpeg = live.drop(frontal, "frontal" + frontal.suffix)
    assert jpeg["location"] == "Bay 2 Bed 1", jpeg
    assert_tile_shows(page, jpeg)

    # The NIH DX DICOM, moved to Bay 1 Bed 2 forty minutes ago.
    nih = data.cxr_data() / "dicom" / "1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
    other = live.drop(
        restamped(
            nih,
            tmp_path / "nih.dcm",
            acquired=now - timedelta(minutes=40),
            location="Bay 1 Bed 2",
            new_instance=False,
        ),
        "nih.dcm",
    )
    assert_tile_shows(page, other)

    # 2. A second X-ray of the same patient: the daemon links it to yesterday's, the chart gains a point.
    day2 = live.drop(
        restamped(
            dicom,
            tmp_path / "day2.dcm",
            acquired=now - timedelta(minutes=5),
            location="Bay 1 Bed 1",
            new_instance=True,
        ),
        "day2.dcm",
    )
    assert day2["patient_key"] == day1["patient_key"], (day1["patient_key"], day2["patient_key"])
    assert day2["trend"] and day2["trend"]["prior_image_id"] == day1["image"]["image_id"], day2["trend"]
    assert_tile_shows(page, day2)
    chart = f"{tile('Bay 1 Bed 1')} svg.trend-chart"
    # The chart draws every image that published extent or risk, and nothing else (a reading whose
    # severity and risk were not validated publishes neither: then there is nothing to draw).
    expected = points(day1, day2)
    page.wait_true(
        f"(document.querySelector({json.dumps(chart)})?.dataset.points ?? null) === {json.dumps(expected)}"
    )
    assert page.count(f"{chart} circle.pt-extent") == len(plotted(day1, day2)["extent"])
    assert page.count(f"{chart} circle.pt-risk") == len(plotted(day1, day2)["risk"])
    assert chart_points(page, "Bay 1 Bed 2") == points(other)  # another patient's chart is untouched

    # 3. Acknowledge on the page: it reaches the daemon, which stores it in its journal. Which real image
    # the model calls abnormal depends on the model: if none so far, COVID-19 X-rays on the cart's bed.
    bay2 = jpeg
    candidates = [
        r for r in data.rows(finding="COVID-19", view="AP", source="cohen") if r["file"].startswith("images/")
    ]
    for row in candidates[:4]:
        if any(ackable(r) for r in (day2, other, bay2)):
            break
        source = data.cxr_data() / row["file"]
        bay2 = live.drop(source, "covid" + source.suffix)
        assert_tile_shows(page, bay2)
    target = next((r for r in (day2, other, bay2) if ackable(r)), None)
    assert target is not None, (
        "the real model read none of the X-rays as abnormal: no acknowledgement to test"
    )
    bed = target["location"]
    page.fill("#user-name", "Nurse Okafor")
    acknowledge(page, f"{tile(bed)} button.ack-button")
    page.wait(f"{tile(bed)}[data-acked=true]")
    assert "Acknowledged by Nurse Okafor" in page.text(tile(bed))
    assert page.count(f"{tile(bed)} button.ack-button") == 0
    journal = Journal(live.daemon.workdir / "journal.sqlite3")
    try:
        stored = wait_for_value(lambda: journal.acknowledgements(target["message_id"]), 20)
        assert [(a["by"], a["display"]) for a in stored] == [("Nurse Okafor", "ward7-live")], stored
        acked = {row["message_id"]: row["acknowledged"] for row in journal.history(limit=20)}
        assert acked[target["message_id"]] is True and acked[day1["message_id"]] is False
    finally:
        journal.close()

    # 4. kill -9 the daemon: the broker publishes its last will and the page says the cart is offline.
    live.daemon.kill()
    banner = f'.banner[data-kind=offline][data-cart="{CART_KEY}"]'
    page.wait(banner, timeout=20)
    assert f"{DEVICE} OFFLINE" in page.text(banner)
    assert "connection lost" in page.text(banner)  # the will's reason, not a clean shutdown's
    assert page.attr(tile("Bay 1 Bed 1"), "data-stale") == "true"
    live.move_cart("Bay 3 Bed 1")
    live.daemon.start()
    page.wait(banner, state="detached", timeout=30)
    page.wait(f'.cart-chip[data-cart="{CART_KEY}"][data-state=online]')
    assert page.attr(tile("Bay 1 Bed 1"), "data-stale") == "false"
    assert page.attr(tile(bed), "data-acked") == "true"  # restart loses nothing

    # 5. A lateral view: refused by the model's view gate, shown as REFUSED with the reason.
    lateral = live.drop(first_image(modality="X-ray", view="L"), "lateral.jpg")
    assert lateral["status"] == "refused" and lateral["reason"], lateral
    assert lateral["location"] == "Bay 3 Bed 1", lateral
    assert_tile_shows(page, lateral)
    assert lateral["reason"] in page.text(tile("Bay 3 Bed 1"))  # in its key sentence or below it
    assert page.count(f"{tile('Bay 3 Bed 1')} button.ack-button") == 0

    # 6. A reload rebuilds all of it from the daemon's retained topics (latest/<bed>, status, ack/<id>).
    page.reload()
    page.wait("#conn[data-state=online]")
    page.wait_true("document.querySelectorAll('.tile').length === 4")
    for result in (day2, other, bay2, lateral):
        assert_tile_shows(page, result)
    page.wait(f"{tile(bed)}[data-acked=true]")
    assert chart_points(page, "Bay 1 Bed 1") == points(day2)  # the prior comes back from day2's trend block

    # 7. The populated ward as a 1080p wall monitor shows it, every published heatmap coloured in.
    heatmaps = sum(1 for r in (day2, other, bay2) if r.get("heatmap"))
    page.wait_true(f"document.querySelectorAll('.heatmap img').length === {heatmaps}")
    out = page.screenshot(ARTIFACTS / "display-live.png")
    assert out.stat().st_size > 20_000
    assert page.eval("[window.innerWidth, window.innerHeight]") == [1920, 1080]
    assert page.eval("document.documentElement.scrollHeight") <= 1080
    assert [line for line in page.logs() if line.startswith(("pageerror", "console.error", "external"))] == []
    page.close()


def wait_for_value(probe: Callable[[], list[dict[str, Any]]], timeout: float) -> list[dict[str, Any]]:
    """Poll until probe() returns something non-empty (the daemon stores acks from its MQTT thread)."""
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value
