"""The ward display in real headless Chromium against a real Mosquitto (WebSockets, auth, ACL).

Results come from `make_result` (schema-valid appliance.result payloads) through a cart process;
`Cart.publish` takes Result JSON lines, so `cxr-appliance process FILE --json` output fits too.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from appliance.result import Acknowledgement
from tests.display.acknowledge import acknowledge
from tests.display.browser import Browser, Page
from tests.display.conftest import ARTIFACTS, DISPLAY_AUTH, Ward
from tests.display.results import make_result
from testsupport.schemas import assert_valid


def tile(bed: str) -> str:
    return f'.tile[data-bed="{bed}"]'


def open_display(browser: Browser, ward: Ward, name: str = "a") -> Page:
    page = browser.page(name, ward.url)
    page.wait("#conn[data-state=online]")
    return page


def assert_clean(page: Page) -> None:
    page.assert_clean()


def test_tile_shows_triage_text_and_measures(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    page = open_display(browser, ward)
    urgent = make_result(
        "Bay 2",
        "urgent",
        "Extensive bilateral opacities; high deterioration risk.",
        patient_key="p-1",
        extent=6.5,
        opacity=4.2,
        risk=0.81,
    )
    normal = make_result(
        "Bay 3", "normal", "No abnormality flagged.", patient_key="p-2", extent=0.3, opacity=0.2, risk=0.05
    )
    refused = make_result(
        "Bay 4", None, "Not a frontal chest X-ray: not analysed.", status="refused", reason="lateral view"
    )
    cart.publish([urgent, normal, refused])

    page.wait(tile("Bay 2"))
    page.wait(tile("Bay 4"))
    assert page.attr(tile("Bay 2"), "data-triage") == "urgent"
    assert page.text(f"{tile('Bay 2')} .triage-word") == "URGENT"
    # No sentences in this payload: the tile leads with the whole text.
    assert page.text(f"{tile('Bay 2')} .key") == urgent.text
    measures = page.text(f"{tile('Bay 2')} .metrics")
    assert "6.5" in measures and "4.2" in measures and "81" in measures
    assert "Not for diagnostic use" in page.text(tile("Bay 2"))
    assert "min ago" in page.text(f"{tile('Bay 2')} .age")
    assert page.text(f"{tile('Bay 3')} .triage-word") == "NORMAL"
    assert page.text(f"{tile('Bay 4')} .triage-word") == "REFUSED"
    assert "lateral view" in page.text(tile("Bay 4"))
    # Colour as well as word: urgent and normal accents differ.
    accent = "getComputedStyle(document.querySelector({!r})).getPropertyValue('--accent').trim()"
    assert page.eval(accent.format(tile("Bay 2"))) != page.eval(accent.format(tile("Bay 3")))
    # The grey heatmap was turned into a colour image on the tile.
    page.wait(f"{tile('Bay 2')} .heatmap img")
    assert page.count(f"{tile('Bay 2')} button.ack-button") == 1
    assert page.count(f"{tile('Bay 3')} button.ack-button") == 0
    assert_clean(page)


def test_trend_chart_gains_a_point_for_the_same_patient(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    page = open_display(browser, ward)
    now = datetime.now(timezone.utc)
    first = make_result(
        "Bed 5",
        "abnormal",
        "Right lower zone opacity.",
        patient_key="p-7",
        acquired=now - timedelta(hours=20),
        extent=2.0,
        opacity=1.5,
        risk=0.3,
    )
    other = make_result(
        "Bed 6", "normal", "No abnormality flagged.", patient_key="p-8", extent=0.2, opacity=0.1, risk=0.1
    )
    cart.publish([first, other])
    chart = f"{tile('Bed 5')} svg.trend-chart"
    page.wait(chart)
    assert page.attr(chart, "data-points") == "1"

    second = make_result(
        "Bed 5",
        "urgent",
        "Opacities now bilateral and extensive.",
        patient_key="p-7",
        acquired=now - timedelta(minutes=5),
        extent=5.5,
        opacity=3.5,
        risk=0.72,
        prior=first,
    )
    cart.publish([second])
    page.wait_true(f"document.querySelector({json.dumps(chart)})?.dataset.points === '2'")
    assert page.count(f"{chart} circle.pt-extent") == 2
    assert page.count(f"{chart} circle.pt-risk") == 2
    assert page.count(f"{chart} polyline") == 2
    assert page.attr(tile("Bed 5"), "data-triage") == "urgent"
    assert "from 30%" in page.text(f"{tile('Bed 5')} .metrics")
    # Another patient's chart is untouched.
    assert page.attr(f"{tile('Bed 6')} svg.trend-chart", "data-points") == "1"
    assert_clean(page)


def test_offline_banner_when_the_carts_last_will_fires(browser: Browser, ward: Ward) -> None:
    cart = ward.cart(device_id="cart-3")
    page = open_display(browser, ward)
    cart.publish([make_result("Bay 9", "normal", "No abnormality flagged.", device_id="cart-3")])
    page.wait('.cart-chip[data-cart="ward7/cart-3"][data-state=online]')
    assert page.count(".banner") == 0
    assert page.attr(tile("Bay 9"), "data-stale") == "false"

    cart.kill()
    page.wait('.banner[data-kind=offline][data-cart="ward7/cart-3"]')
    assert "cart-3 OFFLINE" in page.text(".banner[data-kind=offline]")
    assert page.attr(tile("Bay 9"), "data-stale") == "true"

    ward.cart(device_id="cart-3")  # back online: the retained status flips and the banner goes
    page.wait(".banner[data-kind=offline]", state="detached")
    assert page.attr(tile("Bay 9"), "data-stale") == "false"
    assert_clean(page)


def test_broker_loss_banner_and_automatic_reconnection(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    page = open_display(browser, ward)
    cart.publish(
        [make_result("Bay 1", "abnormal", "Left lower zone opacity.", extent=2.5, opacity=2.0, risk=0.4)]
    )
    page.wait(tile("Bay 1"))
    cart.stop()

    ward.broker.stop()
    page.wait(".banner[data-kind=broker]")
    assert page.attr(tile("Bay 1"), "data-stale") == "true"
    ward.broker.start()
    page.wait("#conn[data-state=online]", timeout=20)
    page.wait(".banner[data-kind=broker]", state="detached")
    assert page.attr(tile("Bay 1"), "data-triage") == "abnormal"


def test_acknowledge_publishes_and_every_display_shows_it(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    result = make_result(
        "Bay 2", "urgent", "Extensive opacities.", patient_key="p-1", extent=6.0, opacity=4.0, risk=0.8
    )
    a = open_display(browser, ward, "a")
    b = open_display(browser, ward, "b")
    with ward.subscriber("cxr/+/+/ack/#") as acks:
        cart.publish([result])
        a.wait(f"{tile('Bay 2')} button.ack-button")
        b.wait(f"{tile('Bay 2')} button.ack-button")

        a.click(f"{tile('Bay 2')} button.ack-button")  # no name yet: asks for one, sends nothing
        a.wait(".banner[data-kind=notice]")
        a.fill("#user-name", "Nurse Okafor")
        acknowledge(a, f"{tile('Bay 2')} button.ack-button", "disagree", "Old scarring.")

        got = acks.wait_count("cxr/ward7/cart-1/ack/#", 1)
        assert len(got) == 1
        # Its own topic per result and display account: the ACL lets it write nowhere else.
        assert got[0].topic == f"cxr/ward7/cart-1/ack/{result.message_id}/{DISPLAY_AUTH[0]}"
        payload = assert_valid(got[0].payload, "ack.v2.json")
        ack = Acknowledgement.model_validate(payload)
        assert (ack.message_id, ack.image_id, ack.by, ack.verdict, ack.comment) == (
            result.message_id,
            result.image.image_id,
            "Nurse Okafor",
            "disagree",
            "Old scarring.",
        )
        assert abs(
            datetime.fromisoformat(ack.at.replace("Z", "+00:00")) - datetime.now(timezone.utc)
        ) < timedelta(minutes=1)

    for page in (a, b):
        page.wait(f"{tile('Bay 2')}[data-acked=true]")
        assert "Acknowledged by Nurse Okafor" in page.text(tile("Bay 2"))
        assert page.text(f"{tile('Bay 2')} .verdict-tag") == " — disagrees"
        assert page.count(f"{tile('Bay 2')} button.ack-button") == 0
    # Retained: a subscriber arriving now still gets it.
    with ward.subscriber("cxr/+/+/ack/#") as late:
        assert late.wait_count("cxr/ward7/cart-1/ack/#", 1)[0].retain
    # The name is remembered on that monitor.
    a.reload()
    a.wait("#conn[data-state=online]")
    assert a.eval("document.getElementById('user-name').value") == "Nurse Okafor"
    assert_clean(a)
    assert_clean(b)
    b.close()


def test_reload_recovers_state_from_retained_topics(browser: Browser, ward: Ward) -> None:
    cart = ward.cart(device_id="cart-2")
    now = datetime.now(timezone.utc)
    old = make_result(
        "Bay 7",
        "normal",
        "Old result.",
        device_id="cart-2",
        patient_key="p-9",
        acquired=now - timedelta(hours=5),
        extent=1.0,
        opacity=1.0,
        risk=0.2,
    )
    new = make_result(
        "Bay 7",
        "abnormal",
        "Newer result for bay 7.",
        device_id="cart-2",
        patient_key="p-9",
        acquired=now - timedelta(minutes=2),
        extent=3.0,
        opacity=2.0,
        risk=0.45,
        prior=old,
    )
    cart.publish([old, new])
    # Published before any display was open: only retained topics can bring these back.
    page = open_display(browser, ward)
    page.wait(tile("Bay 7"))
    assert page.text(f"{tile('Bay 7')} .key") == new.text
    # The newest result's trend block restores the prior point.
    assert page.attr(f"{tile('Bay 7')} svg.trend-chart", "data-points") == "2"
    page.fill("#user-name", "Dr Lee")
    acknowledge(page, f"{tile('Bay 7')} button.ack-button")
    page.wait(f"{tile('Bay 7')}[data-acked=true]")

    page.reload()
    page.wait(f"{tile('Bay 7')}[data-acked=true]")
    page.wait('.cart-chip[data-cart="ward7/cart-2"][data-state=online]')
    assert page.attr(tile("Bay 7"), "data-triage") == "abnormal"
    assert "Acknowledged by Dr Lee" in page.text(tile("Bay 7"))
    assert_clean(page)


def test_screenshot_of_a_populated_ward(browser: Browser, ward: Ward) -> None:
    now = datetime.now(timezone.utc)
    cart1 = ward.cart(device_id="cart-1")
    cart2 = ward.cart(device_id="cart-2")
    p1 = make_result(
        "Bay 1 Bed 1",
        "abnormal",
        "Right lower zone opacity.",
        patient_key="a",
        acquired=now - timedelta(hours=30),
        extent=2.0,
        opacity=1.5,
        risk=0.28,
    )
    p1b = make_result(
        "Bay 1 Bed 1",
        "abnormal",
        "Bilateral lower zone opacities, worse than yesterday.",
        patient_key="a",
        acquired=now - timedelta(hours=6),
        extent=3.5,
        opacity=2.5,
        risk=0.41,
        prior=p1,
    )
    p1c = make_result(
        "Bay 1 Bed 1",
        "urgent",
        "Extensive bilateral opacities; high deterioration risk.",
        patient_key="a",
        acquired=now - timedelta(minutes=7),
        extent=6.5,
        opacity=4.5,
        risk=0.83,
        prior=p1b,
    )
    cart1.publish([p1, p1b, p1c])
    cart1.publish(
        [
            make_result(
                "Bay 1 Bed 2",
                "normal",
                "No abnormality flagged.",
                patient_key="b",
                acquired=now - timedelta(minutes=42),
                extent=0.2,
                opacity=0.1,
                risk=0.04,
            ),
            make_result(
                "Bay 1 Bed 3",
                "abnormal",
                "Left middle and lower zone opacity.",
                patient_key="c",
                acquired=now - timedelta(hours=2, minutes=10),
                extent=3.0,
                opacity=2.0,
                risk=0.35,
            ),
        ]
    )
    cart2.publish(
        [
            make_result(
                "Bay 2 Bed 1",
                None,
                "Not a frontal chest X-ray: not analysed.",
                device_id="cart-2",
                status="refused",
                reason="lateral view",
                acquired=now - timedelta(minutes=15),
            ),
            make_result(
                "Bay 2 Bed 2",
                "abnormal",
                "Right upper zone opacity.",
                device_id="cart-2",
                patient_key="d",
                acquired=now - timedelta(minutes=25),
                extent=1.5,
                opacity=2.0,
                risk=0.22,
            ),
            make_result(
                "Bay 2 Bed 3",
                "normal",
                "No abnormality flagged.",
                device_id="cart-2",
                patient_key="e",
                acquired=now - timedelta(hours=1),
                extent=0.5,
                opacity=0.3,
                risk=0.08,
            ),
        ]
    )
    page = open_display(browser, ward)
    page.wait_true("document.querySelectorAll('.tile').length === 6")
    page.fill("#user-name", "Sr Patel")
    acknowledge(page, f"{tile('Bay 2 Bed 2')} button.ack-button")
    page.wait(f"{tile('Bay 2 Bed 2')}[data-acked=true]")
    cart2.kill()
    page.wait(".banner[data-kind=offline]")
    page.wait_true("document.querySelectorAll('.heatmap img').length === 5")
    out = page.screenshot(ARTIFACTS / "display.png")
    assert out.stat().st_size > 20_000
    # Everything fits on one 1080p screen (a wall monitor has nobody to scroll it).
    assert page.eval("document.documentElement.scrollHeight") <= 1080
    assert_clean(page)
