"""Clinician feedback end to end: the REAL appliance (`cxr-appliance run`, bundled cxr-lite0) reads a real
COVID-19 X-ray, a clinician at one ward display acknowledges it with "disagree" and a comment using the
keyboard only, a second display shows who, when and the verdict, the daemon's journal holds it, and
`cxr-appliance feedback export` writes it to CSV. An ack naming a message the cart never published (a
display account can write acks) is delivered to the daemon and not stored.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest

from appliance.cli import main
from appliance.journal import FEEDBACK_COLUMNS, Journal
from tests.display.browser import Browser
from tests.display.conftest import serve_display
from tests.display.test_display_live import (
    CART_AUTH,
    DEVICE,
    DISPLAY_AUTH,
    SITE,
    LiveWard,
    ackable,
    live_ward,
    tile,
    wait_for_value,
)
from testsupport import data
from testsupport.daemon import wait_until
from testsupport.mosquitto import Broker

COMMENT = "Old scarring, not COVID-19; compare with the CT of 3 March."


@pytest.fixture
def ward(broker_factory: Callable[..., Broker], tmp_path: Path) -> Iterator[tuple[LiveWard, str]]:
    """The live cart with its display, and the URL of a second display (the nurses' station)."""
    with (
        live_ward(broker_factory, tmp_path) as live,
        serve_display(live.broker, "ward7-station", DISPLAY_AUTH) as station,
    ):
        yield live, station


def urgent_or_abnormal(live: LiveWard) -> dict[str, Any]:
    """Drop real COVID-19 X-rays into the cart until the real model calls one urgent or abnormal."""
    rows = [
        r for r in data.rows(finding="COVID-19", view="AP", source="cohen") if r["file"].startswith("images/")
    ]
    for n, row in enumerate(rows[:4]):
        source = data.cxr_data() / row["file"]
        result = live.drop(source, f"covid-{n}{source.suffix}")
        if ackable(result):
            return result
    raise AssertionError("the real model read none of four COVID-19 X-rays as abnormal")


def test_a_disagreement_on_one_display_reaches_every_display_the_journal_and_the_audit_csv(
    browser: Browser, ward: tuple[LiveWard, str], tmp_path: Path
) -> None:
    live, station_url = ward
    bedside = browser.page("bedside", live.url)
    station = browser.page("station", station_url)
    for page in (bedside, station):
        page.wait("#conn[data-state=online]")
    target = urgent_or_abnormal(live)
    bed = target["location"]
    for page in (bedside, station):
        page.wait(f'{tile(bed)}[data-message-id="{target["message_id"]}"][data-needs-ack=true]', timeout=20)

    # A display account may write acks, so one could name a message the cart never published: the daemon
    # receives it (its log says so) and stores nothing. Then an ack of the real result on the old shared
    # shape ack/<message_id>, which only the cart's own account may still write: the daemon ignores it.
    # Both are sent first, so they are handled before the real one.
    bogus = str(uuid.uuid4())
    base = f"cxr/{SITE}/{DEVICE}/ack"
    for topic, message_id, auth in (
        (f"{base}/{bogus}/{DISPLAY_AUTH[0]}", bogus, DISPLAY_AUTH),
        (f"{base}/{target['message_id']}", target["message_id"], CART_AUTH),
    ):
        mqtt_publish.single(
            topic,
            json.dumps(
                {
                    "schema": "cxr-appliance/ack/v2",
                    "message_id": message_id,
                    "by": "Mallory",
                    "at": "2024-03-01T09:00:00Z",
                    "verdict": "agree",
                }
            ),
            qos=1,
            retain=True,
            hostname=live.broker.host,
            port=live.broker.port,
            auth={"username": auth[0], "password": auth[1]},
        )
    assert wait_until(lambda: f"unknown message '{bogus}'" in live.daemon.log(), 20), live.daemon.log()
    assert wait_until(lambda: f"{base}/{target['message_id']}: not ack/" in live.daemon.log(), 20)

    # The bedside clinician, keyboard only: Acknowledge, arrow to "Disagree", Tab to the comment, Enter.
    bedside.fill("#user-name", "Dr Mensah")
    bedside.focus(f"{tile(bed)} button.ack-button")
    bedside.press("Enter")
    bedside.wait("#ack-dialog[open]")
    assert bedside.eval("document.activeElement.name") == "verdict"  # focus starts on the choice
    bedside.press("ArrowRight")
    assert (
        bedside.eval("document.querySelector('#ack-dialog input[name=verdict]:checked')?.value") == "disagree"
    )
    bedside.press("Tab")
    assert bedside.eval("document.activeElement.id") == "ack-comment"
    bedside.fill("#ack-comment", COMMENT)
    bedside.press("Enter")
    bedside.wait("#ack-dialog", state="hidden")
    # Focus is back on the bed's tile, not lost on the page.
    bedside.wait_true(f"document.activeElement?.dataset?.bed === {json.dumps(bed)}")

    # Every display shows who, when and the verdict on the tile, and the comment in the reading.
    for page in (station, bedside):
        page.wait(f"{tile(bed)}[data-acked=true]")
        acked = f"{tile(bed)} .acked[data-verdict=disagree]"
        page.wait(acked)
        assert page.text(acked).startswith("✓ Acknowledged by Dr Mensah at ")
        assert page.text(f"{acked} .verdict-tag") == " — disagrees"
        page.click(f"{tile(bed)} .key")
        page.wait(f'#detail[open][data-message-id="{target["message_id"]}"]')
        assert page.text("#detail .acked .verdict-tag") == " — disagrees with the AI reading"
        assert page.text("#detail .ack-comment") == COMMENT
        page.press("Escape")
        page.wait("#detail", state="hidden")
    assert station.errors() == [] and bedside.errors() == []

    # The daemon's journal: the disagreement with who, where and the result it is about; not the bogus one.
    journal = Journal(live.daemon.workdir / "journal.sqlite3")
    try:
        rows = wait_for_value(journal.feedback, 20)
        assert journal.acknowledgements(bogus) == []
    finally:
        journal.close()
    abnormal = (target.get("abnormal") or {}).get("score")
    assert rows == [
        {
            "message_id": target["message_id"],
            "image_id": target["image"]["image_id"],
            "patient_key": target["patient_key"],
            "acquired_at": target["image"]["acquired_at"],
            "triage": target["triage"],
            "abnormal": abnormal,
            "by": "Dr Mensah",
            "at": rows[0]["at"],
            "display": "ward7-live",
            "verdict": "disagree",
            "comment": COMMENT,
        }
    ]

    # The audit export, read back.
    out = tmp_path / "feedback.csv"
    assert main(["feedback", "export", "--config", str(live.daemon.config_path), "--out", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        exported = list(csv.DictReader(f))
    assert [list(r) for r in exported] == [list(FEEDBACK_COLUMNS)]
    assert {k: exported[0][k] for k in ("message_id", "by", "verdict", "comment", "display")} == {
        "message_id": target["message_id"],
        "by": "Dr Mensah",
        "verdict": "disagree",
        "comment": COMMENT,
        "display": "ward7-live",
    }
    assert exported[0]["abnormal"] == ("" if abnormal is None else str(abnormal))
