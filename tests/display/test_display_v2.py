"""Ward display v2 in real headless Chromium against a real Mosquitto (WebSockets, passwords, ACL):

1. the whole reading: the tile leads with the key sentence, the detail dialog holds the full text and
   every published value (and nothing that was not published), by mouse and by keyboard;
2. a ward's worth: 18 beds on one 1920x1080 screen, also 3840x2160 and portrait 1080x1920, 24 beds at
   1080p; screenshots in artifacts/;
3. alerting: urgent banner and pulsing border, the optional synthesised alarm sound, "not receiving";
4. WCAG AA text contrast measured in the browser, and no request beyond the page's origin and the broker.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest

from appliance.result import DeviceStatus
from tests.display.acknowledge import acknowledge
from tests.display.browser import Browser, Page
from tests.display.conftest import ARTIFACTS, CART_AUTH, DISPLAY_AUTH, Ward, serve_display, ward_broker
from tests.display.results import key_sentence, make_result
from tests.display.ward import abnormal, normal, refused, urgent, ward_results
from testsupport.mosquitto import Broker


def tile(bed: str) -> str:
    return f'.tile[data-bed="{bed}"]'


def open_display(
    browser: Browser, ward: Ward, name: str = "a", size: tuple[int, int] = (1920, 1080), **kw: Any
) -> Page:
    page = browser.page(name, ward.url, *size, **kw)
    page.wait("#conn[data-state=online]")
    return page


def assert_clean(page: Page) -> None:
    page.assert_clean()


def active(page: Page) -> dict[str, Any]:
    return dict(
        page.eval(
            "(() => { const a = document.activeElement;"
            " return {id: a.id, bed: a.dataset ? a.dataset.bed || null : null, cls: a.className}; })()"
        )
    )


def settle(page: Page) -> None:
    """Let the page render and lay out what just arrived (renders are scheduled with setTimeout 0)."""
    page.eval("new Promise((r) => setTimeout(() => requestAnimationFrame(() => r(true)), 50))")


# ---------- 1. the whole reading ----------


def test_tile_leads_with_the_key_sentence_and_the_detail_view_holds_the_whole_reading(
    browser: Browser, ward: Ward
) -> None:
    cart = ward.cart()
    u = urgent("Bay 2 Bed 1", 5)
    a = abnormal("Bay 2 Bed 2", 20)  # opacity, heatmap, zones, cardiac: not published
    n = normal("Bay 2 Bed 3", 30)
    cart.publish([u, a, n])
    page = open_display(browser, ward)
    page.wait_true("document.querySelectorAll('.tile').length === 3")

    # The tile leads with the first sentence after the view sentence, whole; the rest is not on it.
    assert key_sentence(u) == "Possible Pneumonia (0.91)."
    assert page.text(f"{tile('Bay 2 Bed 1')} .key") == "Possible Pneumonia (0.91)."
    assert page.text(f"{tile('Bay 2 Bed 2')} .key") == "Possible Lung Opacity (0.74)."
    assert page.text(f"{tile('Bay 2 Bed 3')} .key") == key_sentence(n)
    on_tile = page.text(tile("Bay 2 Bed 1"))
    assert "Frontal AP view" not in on_tile and "High deterioration risk" not in on_tile
    key_box = page.eval(
        f"(() => {{ const k = document.querySelector({json.dumps(tile('Bay 2 Bed 2') + ' .key')});"
        " return [k.scrollHeight, k.clientHeight, getComputedStyle(k).webkitLineClamp]; })()"
    )
    assert key_box[0] <= key_box[1] and key_box[2] in ("none", ""), key_box  # not cut after n lines
    # Only published values: Bay 2 Bed 2 has extent and risk, no opacity, CTR or heatmap.
    metrics = page.text(f"{tile('Bay 2 Bed 2')} .metrics")
    assert "2.5" in metrics and "22" in metrics
    labels = f"[...document.querySelectorAll({json.dumps(tile('Bay 2 Bed 2') + ' .metric-label')})].map((e) => e.textContent)"
    assert page.eval(labels) == ["Extent", "Risk"]
    assert page.count(f"{tile('Bay 2 Bed 2')} .heatmap") == 0
    assert "–" not in page.text("#tiles")

    # Click: a modal dialog with the whole text and the published values, focus on its Close button.
    page.click(f"{tile('Bay 2 Bed 2')} .key")
    page.wait(f'#detail[open][data-message-id="{a.message_id}"]')
    assert page.eval("document.getElementById('detail').matches(':modal')")
    assert page.attr("#detail", "aria-labelledby") == "detail-title"
    assert page.attr("#detail", "aria-describedby") == "detail-text"
    assert page.text("#detail-title") == "Bay 2 Bed 2 ABNORMAL"
    assert page.text("#detail .detail-text") == a.text
    values = page.text("#detail .detail-values")
    for expected in (
        "Finding: Lung Opacity",
        "0.74 (operating point 0.55) — above",
        "Extent of lung involvement2.50 of 8",
        "Deterioration risk22% — low (threshold 50%)",
        "Not assessedAtelectasis, Effusion, heart size, localisation",
    ):
        assert expected in values, (expected, values)
    for absent in ("Degree of opacity", "Cardiothoracic", "Zones", "Abnormality score"):
        assert absent not in values, (absent, values)
    assert page.count("#detail .heatmap") == 0
    assert active(page)["id"] == "detail-close"
    page.press("Escape")
    page.wait("#detail", state="hidden")
    assert active(page)["bed"] == "Bay 2 Bed 2"  # focus back on the tile that opened it

    # Keyboard: Enter on a focused tile opens it; the urgent one carries every value it published.
    page.focus(tile("Bay 2 Bed 1"))
    page.press("Enter")
    page.wait(f'#detail[open][data-message-id="{u.message_id}"]')
    assert active(page)["id"] == "detail-close"
    values = page.text("#detail .detail-values")
    for expected in (
        "Finding: Pneumonia0.91",
        "Abnormality score0.97",
        "Extent of lung involvement6.50 of 8",
        "Degree of opacity4.50 of 6",
        "Deterioration risk83% — high",
        "Zones (patient's side)right lower 71% (flagged), left lower 55% (flagged)",
        "Not assessedAtelectasis, Effusion",
    ):
        assert expected in values, (expected, values)
    assert "Cardiothoracic" not in values
    page.wait("#detail .heatmap img")
    assert page.text("#detail .detail-text") == u.text
    page.click("#detail-close")
    page.wait("#detail", state="hidden")
    assert active(page)["bed"] == "Bay 2 Bed 1"

    # Space works too; the normal reading shows its cardiothoracic ratio and no risk (none published).
    page.focus(tile("Bay 2 Bed 3"))
    page.press("Space")
    page.wait(f'#detail[open][data-message-id="{n.message_id}"]')
    values = page.text("#detail .detail-values")
    assert "Cardiothoracic ratio0.46 — not enlarged (threshold 0.50)" in values
    assert "Deterioration risk" not in values and "Extent" not in values
    assert page.text("#detail .muted") == "No trend: the patient was not identified."
    assert page.count(f"{tile('Bay 2 Bed 3')} .trend-chart") == 0  # nothing to plot: no empty chart
    # A normal reading asks for no acknowledgement on its tile, but its full reading takes feedback.
    assert page.count(f"{tile('Bay 2 Bed 3')} .ack-button") == 0
    assert page.count("#detail button.ack-button") == 1
    page.press("Escape")
    page.wait("#detail", state="hidden")

    # The tile's Acknowledge button acknowledges without opening the reading; the reading's one works too.
    page.fill("#user-name", "Nurse Adeyemi")
    acknowledge(page, f"{tile('Bay 2 Bed 2')} button.ack-button")
    page.wait(f"{tile('Bay 2 Bed 2')}[data-acked=true]")
    assert not page.eval("document.getElementById('detail').open")
    page.click(f"{tile('Bay 2 Bed 1')} .key")
    page.wait(f'#detail[open][data-message-id="{u.message_id}"]')
    acknowledge(page, "#detail button.ack-button", "unsure")
    page.wait(f"{tile('Bay 2 Bed 1')}[data-acked=true]")
    page.wait_true("document.querySelector('#detail .acked')?.textContent.includes('Nurse Adeyemi')")
    page.press("Escape")
    page.wait("#detail", state="hidden")
    assert_clean(page)


def test_a_click_survives_a_reading_arriving_between_press_and_release(browser: Browser, ward: Ward) -> None:
    """The browser sends no click when the element pressed leaves the page before the release: a reading
    arriving while a finger is on a tile (urgent, for that bed) is drawn after the click, its banner too
    (a new banner moves every tile down); the page's title says URGENT at once."""
    cart = ward.cart()
    a, n = abnormal("Bay 3 Bed 1", 20), normal("Bay 3 Bed 2", 30)
    cart.publish([a, n])
    page = open_display(browser, ward)
    page.wait_true("document.querySelectorAll('.tile').length === 2")
    page.mouse_down(f"{tile('Bay 3 Bed 1')} .key")
    later = urgent("Bay 3 Bed 1", 1)
    cart.publish([later])
    page.wait_true("document.title.startsWith('(1) URGENT')")  # it has arrived ...
    assert page.attr(tile("Bay 3 Bed 1"), "data-message-id") == a.message_id  # ... the tile waits
    assert page.count("#banners .banner-bed") == 0  # and so does the banner
    page.mouse_up()
    page.wait(f'#detail[open][data-message-id="{later.message_id}"]')
    assert page.text("#detail .detail-text") == later.text
    page.wait(f'{tile("Bay 3 Bed 1")}[data-message-id="{later.message_id}"]')
    page.wait("#banners .banner-bed")
    page.press("Escape")
    page.wait("#detail", state="hidden")
    assert active(page)["bed"] == "Bay 3 Bed 1"
    assert_clean(page)


def test_refused_reading_shows_its_reason_and_nothing_else(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    r = refused("Bay 5 Bed 1", 4)
    cart.publish([r])
    page = open_display(browser, ward)
    page.wait(tile("Bay 5 Bed 1"))
    assert (
        page.text(f"{tile('Bay 5 Bed 1')} .key") == "Not read: not a frontal chest X-ray (lateral view 0.97)."
    )
    assert page.count(f"{tile('Bay 5 Bed 1')} .reason") == 0  # the key sentence already names the reason
    page.focus(tile("Bay 5 Bed 1"))
    page.press("Enter")
    page.wait("#detail[open]")
    values = page.text("#detail .detail-values")
    assert "Not read becausenot a frontal chest X-ray" in values
    for absent in ("Finding", "Extent", "risk", "Cardiothoracic"):
        assert absent not in values
    assert page.count("#detail .trend-chart") == 0 and page.count("#detail .ack-button") == 0
    page.press("Escape")
    assert_clean(page)


# ---------- 2. a ward's worth ----------

FIT = """(() => {
  const tiles = [...document.querySelectorAll('.tile')];
  const main = document.getElementById('tiles');
  const bad = [];
  for (const t of tiles) {
    const r = t.getBoundingClientRect();
    const bed = t.dataset.bed;
    if (r.width < 1 || r.top < 0 || r.left < 0 || r.bottom > innerHeight || r.right > innerWidth) bad.push([bed, 'off screen']);
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    if (!hit || !t.contains(hit)) bad.push([bed, 'covered']);
    const inner = t.querySelector('.tile-inner');
    if (inner.scrollHeight > inner.clientHeight + 1 || inner.scrollWidth > inner.clientWidth + 1) bad.push([bed, 'content cut']);
    for (const sel of ['.bed', '.triage-word', '.key', '.ack-button', '.age', '.ndu']) {
      const e = t.querySelector(sel);
      if (!e) continue;
      const q = e.getBoundingClientRect();
      if (q.width < 1 || q.top < r.top - 1 || q.bottom > r.bottom + 1 || q.left < r.left - 1 || q.right > r.right + 1) bad.push([bed, sel]);
    }
  }
  const area = (t) => { const r = t.getBoundingClientRect(); return Math.round(r.width * r.height); };
  return {
    count: tiles.length,
    scrollHeight: document.scrollingElement.scrollHeight, innerHeight,
    scrollWidth: document.scrollingElement.scrollWidth, innerWidth,
    mainOverflow: main.scrollHeight - main.clientHeight,
    bad, big: main.dataset.big, fit: main.dataset.fit,
    order: tiles.map((t) => t.dataset.triage + (t.dataset.acked === 'true' ? '/acked' : '')),
    urgentArea: Math.min(...tiles.filter((t) => t.dataset.triage === 'urgent').map(area)),
    otherArea: Math.max(...tiles.filter((t) => t.dataset.triage !== 'urgent').map(area)),
  };
})()"""


def assert_fits(page: Page, beds: int, *, urgent_larger: bool) -> dict[str, Any]:
    settle(page)
    got = dict(page.eval(FIT))
    assert got["count"] == beds, got
    # No scrollbars: the page is one screen, and the bed area inside it does not scroll either.
    assert got["scrollHeight"] <= got["innerHeight"], got
    assert got["scrollWidth"] <= got["innerWidth"], got
    assert got["mainOverflow"] <= 1 and got["fit"] == "true", got
    # Every bed tile visible, uncovered, with its name, word, key sentence, button, age and NDU inside.
    assert got["bad"] == [], got["bad"]
    # Urgent first (unacknowledged ones before acknowledged), and larger where the screen allows.
    order = got["order"]
    n_urgent = sum(1 for o in order if o.startswith("urgent"))
    assert all(o.startswith("urgent") for o in order[:n_urgent]), order
    assert order[:n_urgent] == sorted(order[:n_urgent], key=lambda o: o.endswith("/acked")), order
    if urgent_larger:
        assert got["big"] in ("2x2", "2x1") and got["urgentArea"] > 1.5 * got["otherArea"], got
    return got


@pytest.fixture
def ward_of_18(ward: Ward) -> Iterator[Ward]:
    """18 beds on two carts: three urgent (one acknowledged), and cart-2 (3 beds) gone offline."""
    cart1 = ward.cart(device_id="cart-1")
    cart2 = ward.cart(device_id="cart-2")
    results = ward_results(15, urgent_beds=3)
    cart1.publish(results)
    cart2.publish(
        [
            make_result(
                f"Side room {i}",
                "normal",
                "",
                device_id="cart-2",
                sentences=[
                    ("Frontal PA view.", "dicom.ViewPosition"),
                    ("No abnormality detected.", "abnormal"),
                ],
                heatmap=False,
                acquired=datetime.now(timezone.utc).replace(microsecond=0),
            )
            for i in (1, 2, 3)
        ]
    )
    acked = next(r for r in results if r.triage == "urgent")
    with ward.subscriber("cxr/+/+/ack/#") as acks:
        payload = {
            "schema": "cxr-appliance/ack/v1",
            "message_id": acked.message_id,
            "image_id": acked.image.image_id,
            "by": "Sr Patel",
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "display": "other-monitor",
        }
        mqtt_publish.single(
            f"cxr/ward7/cart-1/ack/{acked.message_id}/{DISPLAY_AUTH[0]}",
            json.dumps(payload),
            qos=1,
            retain=True,
            hostname=ward.broker.host,
            port=ward.broker.port,
            auth={"username": DISPLAY_AUTH[0], "password": DISPLAY_AUTH[1]},
        )
        acks.wait_count("cxr/ward7/cart-1/ack/+/+", 1)
    cart2.kill()
    yield ward


SCREENS = {
    "display-ward-1080p.png": (1920, 1080),
    "display-ward-4k.png": (3840, 2160),
    "display-ward-portrait.png": (1080, 1920),
}


def test_eighteen_beds_fit_one_screen_at_1080p_4k_and_portrait(browser: Browser, ward_of_18: Ward) -> None:
    for name, size in SCREENS.items():
        page = open_display(browser, ward_of_18, name, size)
        page.wait_true("document.querySelectorAll('.tile').length === 18")
        page.wait(".banner[data-kind=offline]")
        page.wait(".banner[data-kind=urgent][data-count='2']")
        page.wait_true("document.querySelectorAll('.tile[data-stale=true]').length === 3")
        settle(page)
        page.wait_true("document.querySelectorAll('.heatmap img').length === 3")
        got = assert_fits(page, 18, urgent_larger=size[0] > size[1])
        assert got["order"][:3] == ["urgent", "urgent", "urgent/acked"], got["order"]
        out = page.screenshot(ARTIFACTS / name)
        assert out.stat().st_size > 50_000
        assert_clean(page)
        page.close()


@pytest.mark.parametrize(("beds", "urgent_beds"), [(12, 1), (24, 4)])
def test_twelve_to_twenty_four_beds_fit_at_1080p(
    browser: Browser, ward: Ward, beds: int, urgent_beds: int
) -> None:
    ward.cart().publish(ward_results(beds, urgent_beds=urgent_beds))
    page = open_display(browser, ward)
    page.wait_true(f"document.querySelectorAll('.tile').length === {beds}")
    # Urgent tiles are larger up to ~20 beds; with 24 the screen holds them only at one size.
    assert_fits(page, beds, urgent_larger=beds <= 18)
    page.screenshot(ARTIFACTS / f"display-ward-{beds}.png")
    # A different screen: the same beds are laid out again for it, still without scrolling.
    page.resize(1366, 768)
    assert_fits(page, beds, urgent_larger=False)
    assert_clean(page)
    page.close()


# ---------- 3. alerting ----------


def test_unacknowledged_urgent_results_are_impossible_to_miss(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    a = urgent("Bay 4 Bed 6", 2)
    b = urgent("Bay 1 Bed 5", 8)
    other = abnormal("Bay 1 Bed 1", 12)
    cart.publish([other, a, b])
    page = open_display(browser, ward)
    still = open_display(browser, ward, "still", reduced_motion=True)
    banner = ".banner[data-kind=urgent]"
    page.wait(f"{banner}[data-count='2']")
    assert page.text(f"{banner} b") == "2 URGENT results not acknowledged: "
    assert [
        page.eval(f"document.querySelectorAll('{banner} .banner-bed')[{i}].textContent") for i in (0, 1)
    ] == [
        "Bay 1 Bed 5",
        "Bay 4 Bed 6",
    ]
    assert page.eval("document.title").startswith("(2) URGENT")
    # Urgent first, before Bay 1 Bed 1 that sorts earlier by name.
    assert page.eval("[...document.querySelectorAll('.tile')].map((t) => t.dataset.bed)") == [
        "Bay 1 Bed 5",
        "Bay 4 Bed 6",
        "Bay 1 Bed 1",
    ]
    style = "(() => {{ const s = getComputedStyle(document.querySelector({sel!r})); return [s.animationName, parseFloat(s.borderTopWidth), s.borderTopColor]; }})()"
    name, width, _ = page.eval(style.format(sel=tile("Bay 4 Bed 6")))
    assert name == "urgent-pulse" and width >= 5, (name, width)
    assert page.eval(style.format(sel=tile("Bay 1 Bed 1")))[0] == "none"  # abnormal: no pulse
    # The pulse alternates red and white: sample it.
    colours = page.eval(
        "(() => { const t = document.querySelector('.tile[data-bed=\"Bay 4 Bed 6\"]');"
        " const a = t.getAnimations()[0]; a.pause(); const out = [];"
        " for (const f of [0, 0.5]) { a.currentTime = a.effect.getTiming().duration * f;"
        " out.push(getComputedStyle(t).borderTopColor); } a.play(); return out; })()"
    )
    assert colours == ["rgb(255, 59, 59)", "rgb(255, 255, 255)"], colours
    # Reduced motion (a monitor set so): no animation, but a static white border ringed in red.
    still.wait(f"{banner}[data-count='2']")
    name, width, colour = still.eval(style.format(sel=tile("Bay 4 Bed 6")))
    assert name == "none" and width >= 5 and colour == "rgb(255, 255, 255)"
    still.close()

    # The banner's bed opens that bed's reading.
    page.click(f"{banner} .banner-bed:nth-of-type(2)")
    page.wait(f'#detail[open][data-message-id="{a.message_id}"]')
    page.press("Escape")
    page.fill("#user-name", "Dr Osei")
    acknowledge(page, f"{tile('Bay 4 Bed 6')} button.ack-button")
    page.wait(f"{banner}[data-count='1']")
    assert page.eval(style.format(sel=tile("Bay 4 Bed 6")))[0] == "none"
    assert page.eval("document.title").startswith("(1) URGENT")
    acknowledge(page, f"{tile('Bay 1 Bed 5')} button.ack-button")
    page.wait(banner, state="detached")
    assert not page.eval("document.title").startswith("(")
    assert_clean(page)


def test_alarm_sound_is_off_by_default_and_synthesised_when_switched_on(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    page = open_display(browser, ward, record=True)
    sound = "#sound"
    assert (page.attr(sound, "aria-pressed"), page.attr(sound, "data-state")) == ("false", "off")
    cart.publish([urgent("Bay 1 Bed 1", 3)])
    page.wait(".banner[data-kind=urgent]")
    settle(page)
    assert page.attr(sound, "data-tones") == "0"  # off by default: no tone for an urgent result

    page.click(sound)  # the click is the user gesture that lets the AudioContext run
    page.wait(f"{sound}[data-state=on]")
    assert page.attr(sound, "aria-pressed") == "true"
    assert page.text(sound) == "Alarm sound: on"
    page.wait_true("document.getElementById('sound').dataset.tones === '1'")  # confirmation chime
    assert page.eval("localStorage.getItem('cxr-display.sound')") == "on"

    cart.publish([urgent("Bay 1 Bed 2", 1)])  # a new unacknowledged urgent result: a tone
    page.wait_true("document.getElementById('sound').dataset.tones === '2'")
    cart.publish([abnormal("Bay 1 Bed 3", 1)])  # not urgent: no tone
    page.wait(tile("Bay 1 Bed 3"))
    settle(page)
    assert page.attr(sound, "data-tones") == "2"

    page.click(sound)
    page.wait(f"{sound}[data-state=off]")
    cart.publish([urgent("Bay 1 Bed 4", 1)])
    page.wait(".banner[data-kind=urgent][data-count='3']")
    settle(page)
    assert page.attr(sound, "data-tones") == "2"
    # Web Audio synthesis only: no audio file, nothing but the page's own assets and the broker.
    seen = page.requests()
    assert [r for r in seen["requests"] if r["type"] == "media" or not r["url"].startswith(ward.url)] == []
    page.reload()
    page.wait("#conn[data-state=online]")
    assert page.attr(sound, "aria-pressed") == "false"  # this monitor's choice is remembered
    assert_clean(page)


def publish_status(broker: Broker, status: DeviceStatus) -> None:
    """A cart's retained status, published as the cart account would."""
    mqtt_publish.single(
        f"cxr/{status.site}/{status.device_id}/status",
        status.model_dump_json(by_alias=True),
        qos=1,
        retain=True,
        hostname=broker.host,
        port=broker.port,
        auth={"username": CART_AUTH[0], "password": CART_AUTH[1]},
    )


def test_page_says_plainly_when_it_is_not_receiving(
    browser: Browser, broker_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    broker = ward_broker(broker_factory, tmp_path / "mosquitto-files")
    with serve_display(broker, "test-display", silent_after_s=1.5) as url:
        ward = Ward(broker, url)
        try:
            # Connected, but no cart has ever reported: nothing new would ever appear.
            page = open_display(browser, ward)
            page.wait(".banner[data-kind=silent]", timeout=10)
            assert "NOT RECEIVING" in page.text(".banner[data-kind=silent]")
            cart = ward.cart(device_id="cart-9")
            page.wait(".banner[data-kind=silent]", state="detached")
            cart.publish([normal("Bay 9 Bed 1", 3, device_id="cart-9")])
            page.wait(tile("Bay 9 Bed 1"))

            # The cart is up but not accepting images (spool disk full) with results queued to send.
            status = DeviceStatus(
                state="degraded",
                site="ward7",
                device_id="cart-9",
                since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                reason="spool disk full",
                accepting=False,
                outbox_depth=3,
            )
            publish_status(broker, status)
            degraded = '.banner[data-kind=degraded][data-cart="ward7/cart-9"]'
            page.wait(degraded)
            text = page.text(degraded)
            assert "cart-9 DEGRADED" in text and "spool disk full" in text
            assert "not accepting new X-rays" in text and "3 results waiting to be sent" in text

            # Offline (last will) and broker lost: both already said; the broker banner says NOT RECEIVING.
            cart.kill()
            page.wait('.banner[data-kind=offline][data-cart="ward7/cart-9"]')
            assert page.attr(tile("Bay 9 Bed 1"), "data-stale") == "true"
            broker.stop()
            page.wait(".banner[data-kind=broker]")
            assert page.text(".banner[data-kind=broker]").startswith("NOT RECEIVING")
            assert page.text("#conn") == "Reconnecting…"
            broker.start()
            page.wait("#conn[data-state=online]", timeout=20)
            page.wait(".banner[data-kind=broker]", state="detached")
        finally:
            for c in ward.carts:
                c.kill()


def test_a_cart_that_stops_its_heartbeat_is_shown_not_reporting(
    browser: Browser, broker_factory: Callable[..., Broker], tmp_path: Path
) -> None:
    """A hung cart (or a cut network the broker's last will has not noticed) sends no more heartbeats:
    after three missed ones the page says so and marks its tiles stale; a heartbeat clears it."""
    broker = ward_broker(broker_factory, tmp_path / "mosquitto-files")

    def heartbeat() -> None:
        status = DeviceStatus(
            state="online",
            site="ward7",
            device_id="cart-8",
            since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            heartbeat_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            heartbeat_seconds=1.0,
        )
        publish_status(broker, status)

    with serve_display(broker, "test-display") as url:
        ward = Ward(broker, url)
        try:
            cart = ward.cart(device_id="cart-8")
            cart.publish([normal("Bay 8 Bed 1", 2, device_id="cart-8")])
            heartbeat()
            page = open_display(browser, ward)
            page.wait(tile("Bay 8 Bed 1"))
            silent = '.banner[data-kind=silent-cart][data-cart="ward7/cart-8"]'
            # A heartbeat now: opening the page on a loaded machine can take longer than three of them.
            heartbeat()
            page.wait(f"{tile('Bay 8 Bed 1')}[data-stale=false]")
            page.wait(silent, timeout=15)  # 3 heartbeats of 1 s missed, seen at the next 5-s refresh
            assert "cart-8 NOT REPORTING" in page.text(silent)
            assert page.attr(tile("Bay 8 Bed 1"), "data-stale") == "true"
            heartbeat()
            page.wait(silent, state="detached", timeout=10)
            assert page.attr(tile("Bay 8 Bed 1"), "data-stale") == "false"
        finally:
            for c in ward.carts:
                c.kill()


# ---------- 4. contrast and network ----------

CONTRAST = """(() => {
  const parse = (c) => {
    const m = /^rgba?\\(([^)]+)\\)$/.exec(c.trim());
    if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const over = (top, bottom) => {
    const a = top.a + bottom.a * (1 - top.a);
    if (a === 0) return { r: 0, g: 0, b: 0, a: 0 };
    const mix = (k) => (top[k] * top.a + bottom[k] * bottom.a * (1 - top.a)) / a;
    return { r: mix('r'), g: mix('g'), b: mix('b'), a };
  };
  const lum = (c) => {
    const ch = (v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * ch(c.r) + 0.7152 * ch(c.g) + 0.0722 * ch(c.b);
  };
  const ratio = (x, y) => { const [a, b] = [lum(x), lum(y)].sort((p, q) => q - p); return (a + 0.05) / (b + 0.05); };
  const hex = (c) => '#' + [c.r, c.g, c.b].map((v) => Math.round(v).toString(16).padStart(2, '0')).join('');

  const dialog = document.getElementById('detail');
  const scope = dialog.open ? dialog : document.body;
  const elements = new Set();
  const walker = document.createTreeWalker(scope, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) if (walker.currentNode.textContent.trim()) elements.add(walker.currentNode.parentElement);
  for (const input of scope.querySelectorAll('input')) elements.add(input);

  const failures = [];
  let checked = 0;
  for (const el of elements) {
    if (!el.checkVisibility({ visibilityProperty: true })) continue;
    const rect = el.getBoundingClientRect();
    if (rect.width < 1 || rect.height < 1) continue;
    if (el.closest('button:disabled')) continue;  // WCAG 1.4.3: inactive controls are exempt
    const cs = getComputedStyle(el);
    const isSvg = el instanceof SVGElement;
    let fg = parse(isSvg ? cs.fill : cs.color);
    let text = el.textContent.trim();
    if (el.tagName === 'INPUT') {
      if (!el.value) { fg = parse(getComputedStyle(el, '::placeholder').color); text = `placeholder ${el.placeholder}`; }
      else text = el.value;
    }
    const problem = (why) => failures.push({ text: text.slice(0, 50), why });
    if (!fg) { problem(`colour not parsed: ${isSvg ? cs.fill : cs.color}`); continue; }
    // Background: the element's own and its ancestors' colours composited from the root down.
    const chain = [];
    for (let n = el; n; n = n.parentElement) chain.unshift(n);
    let bg = { r: 255, g: 255, b: 255, a: 1 };
    let bad = null;
    for (const n of chain) {
      const s = getComputedStyle(n);
      if (parseFloat(s.opacity) < 1) bad = `opacity ${s.opacity} on ${n.tagName}.${n.className}`;
      if (s.filter !== 'none') bad = `filter on ${n.tagName}.${n.className}`;
      if (n instanceof SVGElement && n.tagName !== 'svg') continue;
      const c = parse(s.backgroundColor);
      if (s.backgroundImage !== 'none') bad = `background image on ${n.tagName}.${n.className}`;
      if (c && c.a > 0) { bg = over(c, bg); if (c.a === 1) bad = bad && bad.startsWith('background image') ? null : bad; }
    }
    // Anything painted under the text that is not an ancestor (an image, a sibling box) breaks the model.
    const stack = document.elementsFromPoint(rect.left + rect.width / 2, rect.top + rect.height / 2);
    const i = stack.indexOf(el);
    for (const n of i >= 0 ? stack.slice(i + 1) : []) {
      if (n.contains(el)) continue;
      if (n.closest('dialog') !== el.closest('dialog')) continue;
      bad = `painted over ${n.tagName}.${n.className}`;
      break;
    }
    if (bad) { problem(bad); continue; }
    const shown = over(fg, bg);
    const size = parseFloat(cs.fontSize);
    const bold = parseInt(cs.fontWeight, 10) >= 700;
    const large = size >= 24 || (bold && size >= 18.66);
    const need = large ? 3 : 4.5;
    const r = ratio(shown, bg);
    checked += 1;
    if (r < need) failures.push({ text: text.slice(0, 50), fg: hex(shown), bg: hex(bg), ratio: Math.round(r * 100) / 100, need, size });
  }
  return { checked, failures };
})()"""

SAMPLED = (
    "(() => { const anims = document.getAnimations(); const out = [];"
    " for (const f of [0, 0.25, 0.5, 0.75]) {"
    "  for (const a of anims) { a.pause(); const d = a.effect.getTiming().duration;"
    "   a.currentTime = (typeof d === 'number' ? d : 0) * f; }"
    f"  const r = {CONTRAST}; out.push({{f, checked: r.checked, failures: r.failures}}); }}"
    " for (const a of anims) a.play(); return out; })()"
)


def assert_contrast(page: Page, what: str, at_least: int) -> int:
    """Every visible text element, at four points of every running animation, meets WCAG AA."""
    settle(page)
    samples = page.eval(SAMPLED)
    for sample in samples:
        assert sample["failures"] == [], (what, sample)
        assert sample["checked"] >= at_least, (what, sample["checked"])
    return int(samples[0]["checked"])


def test_text_contrast_meets_wcag_aa(browser: Browser, ward: Ward) -> None:
    cart1 = ward.cart(device_id="cart-1")
    cart2 = ward.cart(device_id="cart-2")
    results = [
        urgent("Bay 1 Bed 1", 2),
        urgent("Bay 1 Bed 2", 4),
        abnormal("Bay 1 Bed 3", 9),
        abnormal("Bay 1 Bed 4", 11),
        normal("Bay 1 Bed 5", 15),
        refused("Bay 1 Bed 6", 20),
        make_result(
            "Bay 1 Bed 7",
            None,
            "Not read: decode failed (truncated file).",
            status="error",
            reason="decode failed",
        ),
    ]
    cart1.publish(results)
    cart2.publish(
        [normal("Bay 2 Bed 1", 5, device_id="cart-2"), urgent("Bay 2 Bed 2", 6, device_id="cart-2")]
    )
    page = open_display(browser, ward)
    page.wait_true("document.querySelectorAll('.tile').length === 9")
    page.fill("#user-name", "Sr Patel")
    acknowledge(page, f"{tile('Bay 1 Bed 3')} button.ack-button", "disagree", "Effusion, not opacity.")
    acknowledge(page, f"{tile('Bay 1 Bed 2')} button.ack-button")
    page.wait(f"{tile('Bay 1 Bed 3')}[data-acked=true]")
    page.wait(f"{tile('Bay 1 Bed 2')}[data-acked=true]")
    page.click("#sound")
    page.wait("#sound[data-state=on]")
    cart2.kill()  # offline banner, stale tiles, offline cart chip
    page.wait(".banner[data-kind=offline]")
    page.wait_true("document.querySelectorAll('.heatmap img').length === 3")
    page.eval("document.getElementById('user-name').value = ''")  # the placeholder, too
    page.click(f"{tile('Bay 1 Bed 4')} button.ack-button")  # no name: the notice banner
    page.wait(".banner[data-kind=notice]")
    assert_contrast(page, "ward", at_least=60)
    page.fill("#user-name", "Sr Patel")

    # The verdict dialog: sent without a choice (the hint), then a choice and a comment.
    page.click(f"{tile('Bay 1 Bed 4')} button.ack-button")
    page.wait("#ack-dialog[open]")
    page.click("#ack-send")
    page.wait_true("document.getElementById('ack-hint').textContent !== ''")
    page.click('#ack-dialog input[name=verdict][value="unsure"]')
    page.fill("#ack-comment", "Compare with yesterday.")
    assert_contrast(page, "verdict dialog", at_least=60)
    page.press("Escape")
    page.wait("#ack-dialog", state="hidden")
    assert page.attr(tile("Bay 1 Bed 4"), "data-acked") == "false"  # cancelled: nothing sent

    # The detail view of each kind of reading.
    for bed in ("Bay 1 Bed 1", "Bay 1 Bed 3", "Bay 1 Bed 6", "Bay 2 Bed 2"):
        page.click(f"{tile(bed)} .key")
        page.wait(f'#detail[open][data-bed="{bed}"]')
        assert_contrast(page, f"detail {bed}", at_least=10)
        page.press("Escape")
        page.wait("#detail", state="hidden")

    # Broker lost: red banner, "Reconnecting…", every tile stale.
    ward.broker.stop()
    page.wait(".banner[data-kind=broker]")
    page.wait_true("document.querySelectorAll('.tile[data-stale=true]').length === 9")
    assert_contrast(page, "broker lost", at_least=60)
    page.screenshot(ARTIFACTS / "display-contrast-states.png")
    ward.broker.start()
    page.wait("#conn[data-state=online]", timeout=20)
    page.assert_clean(broker_was_down=True)


def test_page_loads_nothing_but_its_own_origin_and_the_broker(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    hostile = make_result(
        'Bay <img src="http://example.invalid/bed.png">',
        "urgent",
        "",
        sentences=[
            ("Frontal AP view.", "dicom.ViewPosition"),
            ('Possible <img src="https://example.invalid/x.png" onerror="alert(1)"> (0.9).', "findings.X"),
            ("Not for diagnostic use.", "disclaimer"),
        ],
        findings=[('<script src="//example.invalid/s.js"></script>', 0.9, 0.5)],
        extent=5.0,
        risk=0.7,
        patient_key="p-h",
    )
    cart.publish([hostile, urgent("Bay 1 Bed 1", 3), normal("Bay 1 Bed 2", 8)])
    page = open_display(browser, ward, record=True)
    page.wait_true("document.querySelectorAll('.tile').length === 3")
    page.wait_true("document.querySelectorAll('.heatmap img').length === 2")
    bad = f'.tile[data-message-id="{hostile.message_id}"]'
    # Payload text is text: shown literally, never parsed as markup.
    assert page.text(f"{bad} .bed") == hostile.location
    assert page.text(f"{bad} .key") == key_sentence(hostile)
    assert page.count(f"{bad} .bed *, {bad} .key *") == 0
    page.click(f"{bad} .key")
    page.wait("#detail[open]")
    assert '<script src="//example.invalid/s.js"></script>' in page.text("#detail .detail-values")
    assert page.count("#detail .detail-values script, #detail .detail-text img") == 0
    page.press("Escape")
    page.click("#sound")
    page.wait("#sound[data-state=on]")
    page.reload()
    page.wait("#conn[data-state=online]")
    page.wait_true("document.querySelectorAll('.tile').length === 3")
    settle(page)

    seen = page.requests()
    origin = ward.url.rstrip("/")
    broker = f"ws://127.0.0.1:{ward.broker.ws_port}"
    urls = [r["url"] for r in seen["requests"]]
    assert [u for u in urls if not (u == ward.url or u.startswith(origin + "/"))] == [], urls
    assert [u for u in seen["sockets"] if not (u == broker or u.startswith(broker + "/"))] == [], seen[
        "sockets"
    ]
    assert len(seen["sockets"]) >= 2  # one per page load: the broker really is what it talks to
    paths = {u[len(origin) :].split("?")[0] for u in urls}
    assert {"/", "/style.css", "/app.js", "/vendor/mqtt.min.js", "/config.json"} <= paths, paths
    assert_clean(page)
