"""Ward display v2 on the REAL appliance (daemon, bundled cxr-lite0, Mosquitto with passwords and the
product's ACL, headless Chromium): the X-ray thumbnail cropped to the thorax on its own retained topic,
and the patient's history answered from the cart's journal to a display that starts late.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian

from appliance.result import HistoryPoint
from tests.display.browser import Browser
from tests.display.test_display_live import (
    DEVICE,
    DISPLAY_AUTH,
    SITE,
    LiveWard,
    chart_points,
    live_ward,
    points,
    restamped,
    tile,
)
from testsupport import data
from testsupport.mosquitto import Broker, Subscriber
from testsupport.schemas import assert_valid

BASE = f"cxr/{SITE}/{DEVICE}"
SIIM = data.cxr_data() / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
# A real COVID-19 X-ray the bundled model reads as urgent with extent and risk published: its trend has
# values to plot. Its pixels go into a DICOM that names a patient, so the daemon keys it.
COVID = "images/cohen/1-s2.0-S0085253820303616-gr1_lrg-a.png"
BURNED_IN = "DOE^JANE 0123456"


@pytest.fixture
def live(broker_factory: Callable[..., Broker], tmp_path: Path) -> Iterator[LiveWard]:
    with live_ward(broker_factory, tmp_path) as ward:
        yield ward


def display_client(broker: Broker, topics: str, auth: tuple[str, str] | None = DISPLAY_AUTH) -> Subscriber:
    user, password = auth if auth else (None, None)
    return Subscriber(broker, topics, clean_session=True, username=user, password=password)


def grey8(pixels: np.ndarray) -> np.ndarray:
    low, high = float(pixels.min()), float(pixels.max())
    return ((pixels.astype(np.float32) - low) / (high - low) * 255).round().astype(np.uint8)


def with_burned_in_text(target: Path) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A real frontal X-ray (SIIM) as PNG with a name and ID burned in bright into its top-left corner,
    as X-ray units do. Returns the clean pixels and the text's box (x0, y0, x1, y1)."""
    clean = grey8(pydicom.dcmread(SIIM).pixel_array)
    picture = Image.fromarray(clean, mode="L")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=40)
    draw.text((12, 8), BURNED_IN, fill=255, font=font)
    box = draw.textbbox((12, 8), BURNED_IN, font=font)
    picture.save(target)
    written = np.asarray(Image.open(target))
    assert (written != clean).any() and written[box[1] : box[3], box[0] : box[2]].max() == 255
    return clean, (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


def as_patient_dicom(png: Path, target: Path) -> Path:
    """The PNG's real pixels in an uncompressed DICOM that keeps the SIIM file's patient."""
    ds = pydicom.dcmread(SIIM)
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    return target


def test_thumbnail_is_cropped_to_the_thorax_retained_per_bed_and_shown(
    browser: Browser, live: LiveWard, tmp_path: Path
) -> None:
    source = tmp_path / "burned-in.png"
    clean, (tx0, ty0, tx1, ty1) = with_burned_in_text(source)
    result = live.drop(source, "burned-in.png")
    assert result["status"] == "ok", result
    bed = result["location"]
    # Not inside the result: not a field of it, and the picture's bytes nowhere in it.
    assert "thumbnail" not in result

    # Retained: a display that subscribes only now still gets it, on the bed's own topic. The thumbnail
    # follows the result on the wire, so a display subscribing the moment the result arrived may see it
    # go by live (retain 0); the display after that one must get the retained copy.
    for _ in range(2):
        with display_client(live.broker, f"{BASE}/thumbnail/#") as sub:
            assert sub.wait_for(lambda ms: bool(ms), 20), live.daemon.log()
            (message,) = sub.on_topic(f"{BASE}/thumbnail/#")
        if message.retain:
            break
    assert message.retain and message.topic == f"{BASE}/thumbnail/Bay_2_Bed_1"
    thumb = message.json()
    assert_valid(thumb, "thumbnail.v1.json")
    assert thumb["message_id"] == result["message_id"] and "patient_key" not in thumb
    assert thumb["png_base64"] not in json.dumps(result)
    picture = Image.open(io.BytesIO(base64.b64decode(thumb["png_base64"])))
    assert picture.size == (thumb["width"], thumb["height"]) and max(picture.size) <= 256
    assert thumb["overlay"] is None and picture.mode == "L"  # cxr-lite0 publishes no heatmap

    # The crop box leaves the burned-in text out ...
    h, w = clean.shape
    crop = thumb["crop"]
    x0, y0, x1, y1 = (round(crop[k] * n) for k, n in (("left", w), ("top", h), ("right", w), ("bottom", h)))
    assert x0 >= tx1 or y0 >= ty1 or x1 <= tx0 or y1 <= ty0, (crop, (tx0, ty0, tx1, ty1))
    assert (x1 - x0) * (y1 - y0) < 0.8 * w * h  # a crop, not the whole image
    # ... and the pixels agree: the thumbnail is that region of the image WITHOUT the text.
    expected = Image.fromarray(clean).crop((x0, y0, x1, y1)).resize(picture.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(picture, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.mean() < 2.0 and np.percentile(diff, 99.9) <= 12, (diff.mean(), diff.max())

    # The page shows it on the tile, says the localisation is not assessed, and large in the detail view.
    page = browser.page("thumbnail", live.url)
    figure = f'{tile(bed)}[data-message-id="{result["message_id"]}"] figure.xray'
    page.wait(f"{figure} img", timeout=30)
    assert page.attr(figure, "data-overlay") == "false"
    assert "localisation not assessed" in page.text(f"{figure} figcaption")
    size = page.eval(
        f"(i => [i.naturalWidth, i.naturalHeight])(document.querySelector({json.dumps(figure + ' img')}))"
    )
    assert size == [thumb["width"], thumb["height"]]
    page.click(f"{tile(bed)} .key")
    page.wait("#detail[open] figure.xray-large img")
    shown = page.eval(
        "document.querySelector('#detail figure.xray-large img').getBoundingClientRect().height"
    )
    assert shown > page.eval(
        f"document.querySelector({json.dumps(figure + ' img')}).getBoundingClientRect().height"
    )
    page.press("Escape")
    assert [line for line in page.logs() if line.startswith(("pageerror", "console.error", "external"))] == []
    page.close()


def ask_history(broker: Broker, patient_key: str, auth: tuple[str, str]) -> dict[str, Any] | None:
    """A history request as a display sends it; the cart's answer, or None."""
    request_id = uuid.uuid4().hex[:12]
    with display_client(broker, f"{BASE}/history/response", auth) as client:
        request = {
            "schema": "cxr-appliance/history-request/v1",
            "request_id": request_id,
            "patient_key": patient_key,
            "limit": 10,
        }
        client.client.publish(f"{BASE}/history/request", json.dumps(request), qos=1)
        mine = lambda ms: [m.json() for m in ms if m.json()["request_id"] == request_id]  # noqa: E731
        client.wait_for(lambda ms: bool(mine(ms)), 15)
        answers = mine(client.on_topic(f"{BASE}/history/response"))
    return answers[0] if answers else None


def test_display_that_starts_late_shows_earlier_images_from_the_journal(
    browser: Browser, live: LiveWard, tmp_path: Path
) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    patient = as_patient_dicom(data.cxr_data() / COVID, tmp_path / "covid.dcm")
    # Three X-rays of one patient before any display is open. The newest result's trend block names only
    # the one before it: the first image reaches a late display from the journal alone.
    results = [
        live.drop(
            restamped(
                patient,
                tmp_path / f"x{i}.dcm",
                acquired=now - timedelta(hours=hours),
                location="Bay 1 Bed 1",
                new_instance=i > 0,
            ),
            f"x{i}.dcm",
        )
        for i, hours in enumerate((30, 10, 1))
    ]
    key = results[0]["patient_key"]
    assert key and all(r["patient_key"] == key for r in results), [r["patient_key"] for r in results]
    assert results[2]["trend"]["prior_image_id"] == results[1]["image"]["image_id"]
    expected = points(*results)
    assert expected == "3", "the model published neither extent nor risk: nothing to chart"
    assert points(results[2]) == "2"  # what a late display could draw without the journal

    # The query itself: the display account gets pseudonymous keys and published values only ...
    answer = ask_history(live.broker, key, DISPLAY_AUTH)
    assert answer is not None, live.daemon.log()
    assert_valid(answer, "history.v1.json")
    assert answer["patient_key"] == key
    assert [p["image_id"] for p in answer["points"]] == [r["image"]["image_id"] for r in results]
    for p, r in zip(answer["points"], results, strict=True):
        assert set(p) == set(HistoryPoint.model_fields)
        assert (p["extent"], p["risk"]) == (r["severity"]["extent"], r["risk"]["score"])
    # ... and nobody without the display's password can ask: the broker refuses the login.
    for auth in (None, (DISPLAY_AUTH[0], "wrong")):
        with pytest.raises(TimeoutError, match=r"[Nn]ot authori[sz]ed"):
            display_client(live.broker, f"{BASE}/history/response", auth)

    # A page opened only now charts all three images; the first came from the cart's journal.
    page = browser.page("late", live.url)
    bed = results[2]["location"]
    chart = f"{tile(bed)} svg.trend-chart"
    page.wait(chart, timeout=30)
    page.wait_true(
        f"(document.querySelector({json.dumps(chart)})?.dataset.points ?? null) === '3'", timeout=20
    )
    assert chart_points(page, bed) == expected
    assert [line for line in page.logs() if line.startswith(("pageerror", "console.error", "external"))] == []
    page.close()
