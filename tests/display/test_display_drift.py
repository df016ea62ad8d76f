"""The drift banner in real headless Chromium: the cart's retained status (appliance.result.DeviceStatus,
as the daemon publishes it) names the drifted outputs; the banner names them and goes when drift clears.
The daemon side (real images, real PSI) is tested in tests/ops/test_drift.py."""

from __future__ import annotations

from datetime import datetime, timezone

import paho.mqtt.publish as mqtt_publish

from appliance.result import DeviceStatus
from tests.display.browser import Browser
from tests.display.conftest import CART_AUTH, Ward
from tests.display.test_display import assert_clean, open_display, tile
from tests.display.ward import normal

DRIFT = '.banner[data-kind=drift][data-cart="ward7/cart-1"]'


def publish_status(ward: Ward, drift: list[str]) -> None:
    status = DeviceStatus(
        state="online",
        site="ward7",
        device_id="cart-1",
        since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        drift=drift,
    )
    mqtt_publish.single(
        "cxr/ward7/cart-1/status",
        status.model_dump_json(by_alias=True),
        qos=1,
        retain=True,
        hostname=ward.broker.host,
        port=ward.broker.port,
        auth={"username": CART_AUTH[0], "password": CART_AUTH[1]},
    )


def test_drift_banner_names_the_outputs_and_clears(browser: Browser, ward: Ward) -> None:
    cart = ward.cart()
    page = open_display(browser, ward)
    cart.publish([normal("Bay 2 Bed 1", 3)])
    page.wait(tile("Bay 2 Bed 1"))
    assert page.count(".banner") == 0

    publish_status(ward, ["input.contrast", "abnormal"])
    page.wait(DRIFT)
    text = page.text(DRIFT)
    assert "cart-1 DRIFT in input.contrast, abnormal" in text and "Readings continue" in text
    # A warning, not a fault: no degraded/not-accepting banner, and the tile is not stale.
    assert page.count(".banner") == 1
    assert page.attr(tile("Bay 2 Bed 1"), "data-stale") == "false"

    publish_status(ward, [])
    page.wait(DRIFT, state="detached")
    assert page.count(".banner") == 0
    assert_clean(page)
