"""The MQTT publisher against a real Mosquitto: delivery, last will, outages, crashes, auth, TLS, acks."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config import DeviceConfig, MqttConfig, TlsConfig
from appliance.journal import Journal
from appliance.publish import MqttPublisher, Outbox
from appliance.result import Acknowledgement
from testsupport.mosquitto import Broker, Received, Subscriber, unique_by_message_id
from testsupport.results import make_result
from testsupport.schemas import assert_valid

REPO = Path(__file__).resolve().parents[2]
BASE = "cxr/site/cart-1"
Factory = Callable[..., MqttPublisher]


@pytest.fixture
def publisher_factory(tmp_path: Path) -> Iterator[Factory]:
    made: list[MqttPublisher] = []

    def make(broker: Broker, outbox: Outbox | None = None, **mqtt_options: object) -> MqttPublisher:
        options: dict[str, object] = {"host": broker.host, "port": broker.port, "reconnect_max_seconds": 0.5}
        options.update(mqtt_options)
        outbox = outbox or Outbox(tmp_path / f"outbox{len(made)}.sqlite3")
        on_ack = options.pop("on_ack", None)
        pub = MqttPublisher(MqttConfig.model_validate(options), DeviceConfig(), outbox, on_ack=on_ack)  # type: ignore[arg-type]
        made.append(pub)
        return pub.start()

    yield make
    for pub in made:
        pub.close(timeout=1)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def statuses(messages: list[Received]) -> list[dict[str, object]]:
    return [m.json() for m in messages if m.topic == f"{BASE}/status"]


def test_results_are_schema_valid_and_latest_is_retained_per_bed(
    broker: Broker, subscriber_factory: Callable[..., Subscriber], publisher_factory: Factory
) -> None:
    sub = subscriber_factory("cxr/#")
    pub = publisher_factory(broker)
    results = [make_result(n, location="ICU bed 3/A" if n % 2 else "bed-1") for n in range(6)]
    for r in results:
        pub.publish_result(r)
    assert pub.flush(10)
    got = sub.wait_count(f"{BASE}/result", 6)
    assert [assert_valid(m.payload, "result.v2.json")["message_id"] for m in got] == [
        r.message_id for r in results
    ]
    assert all(not m.retain and m.qos == 1 for m in got)
    assert sub.wait_for(lambda ms: any(m.topic == f"{BASE}/status" for m in ms))
    status = assert_valid(sub.on_topic(f"{BASE}/status")[0].payload, "status.v1.json")
    assert status["state"] == "online"

    # A display that (re)loads now recovers the newest result of each bed from the retained topics.
    late = subscriber_factory(f"{BASE}/latest/+", clean_session=True)
    retained = late.wait_count(f"{BASE}/latest/+", 2)
    by_topic = {m.topic: m.json()["message_id"] for m in retained}
    assert by_topic == {
        f"{BASE}/latest/bed-1": results[4].message_id,
        f"{BASE}/latest/ICU_bed_3_A": results[5].message_id,  # sanitised: no '/' or spaces in the level
    }
    assert all(m.retain for m in retained)


def test_status_changes_are_retained(
    broker: Broker, subscriber_factory: Callable[..., Subscriber], publisher_factory: Factory
) -> None:
    pub = publisher_factory(broker)
    assert wait_until(lambda: pub.connected)
    pub.publish_status("degraded", reason="spool disk full", accepting=False, queue_depth=3)
    sub = subscriber_factory(f"{BASE}/status")
    assert sub.wait_for(lambda ms: any(m.json()["state"] == "degraded" for m in ms))
    status = assert_valid(sub.messages[-1].payload, "status.v1.json")
    assert (status["reason"], status["accepting"], status["queue_depth"]) == ("spool disk full", False, 3)
    pub.publish_status("online")
    assert sub.wait_for(lambda ms: ms[-1].json()["state"] == "online")


def _spawn(broker_port: int, outbox: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.publish.publisher_proc", "--port", str(broker_port), "--outbox", str(outbox),
         *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def _read_until(proc: subprocess.Popen[str], line: str, timeout: float = 20.0) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline().strip()
        if got == line:
            return
        if not got and proc.poll() is not None:
            break
    raise AssertionError(f"publisher process never printed {line!r}")


def test_status_is_repeated_every_heartbeat_even_when_nothing_changes(
    broker: Broker, publisher_factory: Factory
) -> None:
    with Subscriber(broker, f"{BASE}/status") as sub:
        pub = publisher_factory(broker, heartbeat_seconds=5)
        assert sub.wait_for(lambda ms: len(ms) >= 3, 16), [m.json() for m in sub.messages]
    beats = [m.json() for m in sub.messages]
    assert all(b["heartbeat_seconds"] == 5 and b["state"] == "online" for b in beats)
    sent = [datetime.fromisoformat(b["heartbeat_at"]) for b in beats]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(sent)]
    assert all(4.5 <= g <= 7.0 for g in gaps), gaps  # about every 5 s, not more often
    assert len({b["since"] for b in beats}) == 1  # nothing changed: the same state since the start
    assert pub.connected


def test_last_will_turns_status_offline_when_the_process_is_killed(
    broker: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(f"{BASE}/status")
    proc = _spawn(broker.port, tmp_path / "outbox.sqlite3")
    try:
        _read_until(proc, "connected")
        assert sub.wait_for(lambda ms: any(s["state"] == "online" for s in statuses(ms)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert sub.wait_for(lambda ms: statuses(ms)[-1]["state"] == "offline")
    finally:
        proc.kill()
        proc.wait()
    # A display connecting afterwards sees the retained `offline`.
    late = subscriber_factory(f"{BASE}/status", clean_session=True)
    [retained] = late.wait_count(f"{BASE}/status", 1)
    assert retained.retain
    assert assert_valid(retained.payload, "status.v1.json")["state"] == "offline"


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_broker_outage_loses_nothing_and_keeps_order(
    broker_factory: Callable[..., Broker], publisher_factory: Factory, how: str
) -> None:
    # sigkill: the broker saves its state on every change, so the display's session survives the kill.
    broker = broker_factory(autosave=how == "sigkill")
    sub = Subscriber(broker, f"{BASE}/#", client_id="ward-display-1")  # persistent session
    pub = publisher_factory(broker)
    assert wait_until(lambda: pub.connected)
    results = [make_result(n, location=f"bed-{n % 4}") for n in range(100)]
    try:
        for r in results[:50]:
            pub.publish_result(r)
        killed_at = time.time()
        broker.stop() if how == "graceful" else broker.kill()  # mid-run: some rows are still in flight
        assert wait_until(lambda: not pub.connected, 5)
        for r in results[50:]:
            pub.publish_result(r)
        assert pub.outbox.depth() >= 100  # 50 results x (result + latest), nothing dropped while away
        broker.start()
        assert pub.flush(30), f"outbox still holds {pub.outbox.depth()}"
        assert pub.outbox.dropped == 0
        expected = [r.message_id for r in results]
        if how == "sigkill":
            # What the broker had acknowledged before SIGKILL lived only in its memory; that loss is the
            # broker's. Everything the outbox had NOT seen acknowledged must arrive.
            acked_before = acked_before_kill(pub.outbox.path, f"{BASE}/result", killed_at)
            assert len(acked_before) < 50
            expected = [m for m in expected if m not in acked_before]
        got = sub.wait_count(f"{BASE}/result", len(expected), timeout=20)
        received = [u["message_id"] for u in unique_by_message_id(got)]
        assert [m for m in received if m in expected] == expected  # none lost, in order
        assert received == [r.message_id for r in results if r.message_id in received]
        for bed in range(4):  # per-topic order of the retained latest/<bed> stream, too
            seen = [m["message_id"] for m in unique_by_message_id(sub.on_topic(f"{BASE}/latest/bed-{bed}"))]
            assert seen == [
                r.message_id for r in results if r.location == f"bed-{bed}" and r.message_id in seen
            ]
            assert seen[-1] == [r.message_id for r in results if r.location == f"bed-{bed}"][-1]
        # `online` was published again after the reconnect (the last will had said offline).
        assert pub.connects >= 2
        assert sub.wait_for(lambda ms: statuses(ms)[-1]["state"] == "online")
    finally:
        sub.close()


def test_qos_0_results_are_not_marked_sent_while_the_broker_is_away(
    broker_factory: Callable[..., Broker], publisher_factory: Factory
) -> None:
    """QoS 0 has no PUBACK: a message paho cannot write is dropped by paho, so the outbox keeps it until
    it is really written after the reconnect (it used to be marked sent at hand-over, i.e. lost)."""
    broker = broker_factory()
    pub = publisher_factory(broker, qos=0)
    assert wait_until(lambda: pub.connected)
    broker.stop()
    assert wait_until(lambda: not pub.connected, 5)
    # The window between the socket dropping and paho's on_disconnect: the publisher still believes it
    # is connected, so the drain thread hands messages to paho, which cannot write them.
    pub._connected.set()
    results = [make_result(n, location=f"bed-{n % 4}") for n in range(20)]
    for r in results:
        pub.publish_result(r)
    time.sleep(1.0)  # the drain thread runs every 0.5 s at most: it had its chances to lose them
    assert pub.outbox.depth() == 40  # 20 x (result + latest/<bed>), none marked sent
    pub._connected.clear()
    broker.start()
    assert pub.flush(30), f"outbox still holds {pub.outbox.depth()}"
    # The retained latest/<bed> shows that what waited was really written once the broker was back
    # (paho reports a QoS 0 message sent when it is queued for the socket: allow it a moment).
    last = {f"{BASE}/latest/bed-{b}": [r for r in results if r.location == f"bed-{b}"][-1] for b in range(4)}
    with Subscriber(broker, f"{BASE}/latest/#") as sub:
        assert sub.wait_for(
            lambda ms: all(
                any(m.topic == t and r.message_id.encode() in m.payload for m in ms) for t, r in last.items()
            ),
            10,
        ), [(m.topic, m.payload[:60]) for m in sub.messages]


def acked_before_kill(outbox: Path, topic: str, killed_at: float) -> set[str]:
    with closing(sqlite3.connect(outbox)) as db:
        rows = db.execute(
            "SELECT message_id FROM outbox WHERE topic = ? AND state = 'acked' AND done_at < ?",
            (topic, killed_at),
        ).fetchall()
    return {r[0] for r in rows}


def test_publisher_kill9_with_a_full_outbox_delivers_everything_after_restart(
    broker: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(f"{BASE}/result", client_id="ward-display-2")
    outbox = tmp_path / "outbox.sqlite3"
    broker.stop()  # the ward network is down while the cart works
    proc = _spawn(broker.port, outbox, "--count", "40")
    try:
        _read_until(proc, "queued 39")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        proc.kill()
        proc.wait()
    assert Outbox(outbox).depth() == 80
    broker.start()
    # Crash while sending: kill again once some (not all) have been delivered.
    proc = _spawn(broker.port, outbox, "--start", "40", "--count", "200", "--interval", "0.005")
    try:
        sub.wait_count(f"{BASE}/result", 60, timeout=20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        proc.kill()
        proc.wait()
    # Restart like the daemon would: re-put everything (idempotent), then drain.
    proc = _spawn(broker.port, outbox, "--start", "0", "--count", "240", "--flush-and-exit")
    assert proc.wait(60) == 0
    assert Outbox(outbox).depth() == 0
    got = sub.wait_count(f"{BASE}/result", 240, timeout=20)
    unique = unique_by_message_id(got)
    assert [u["message_id"] for u in unique] == [make_result(n).message_id for n in range(240)]
    # Duplicates only for what was in flight at the kill (bounded by the publisher's window).
    assert len(got) - len(unique) <= 16 + 2


def test_authentication_refuses_wrong_password_and_anonymous(
    broker_factory: Callable[..., Broker],
    publisher_factory: Factory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "s3cret-Pa55"
    b = broker_factory(users={"cart": secret, "display": "d"}, acl="user cart\ntopic readwrite cxr/#\n")
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-it\n")
    bad = publisher_factory(b, username="cart", password_file=wrong)
    anon = publisher_factory(b)
    bad.publish_result(make_result(1))
    anon.publish_result(make_result(2))
    time.sleep(1.5)
    assert not bad.connected and not anon.connected
    assert bad.outbox.depth() == 2 and anon.outbox.depth() == 2  # kept, not dropped
    assert "refused the connection" in caplog.text

    good_file = tmp_path / "good"
    good_file.write_text(secret + "\n")
    good_file.chmod(0o600)
    good = publisher_factory(b, username="cart", password_file=good_file)
    good.publish_result(make_result(3))
    assert good.flush(10)
    assert secret not in caplog.text  # never logged, not even at DEBUG


def test_broker_acl_refusal_is_loud_not_silent(
    broker_factory: Callable[..., Broker],
    publisher_factory: Factory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A display account may only publish acknowledgements; MQTT 5 tells the publisher so.
    b = broker_factory(
        users={"display": "pw"}, acl="user display\ntopic read cxr/#\ntopic write cxr/+/+/ack\n"
    )
    pw = tmp_path / "pw"
    pw.write_text("pw")
    pub = publisher_factory(b, username="display", password_file=pw)
    pub.publish_result(make_result(1))
    assert pub.flush(10)
    assert pub.outbox.counter("rejected") == 2
    assert "broker refused" in caplog.text


def test_tls_with_generated_certificates(
    broker_factory: Callable[..., Broker],
    subscriber_factory: Callable[..., Subscriber],
    publisher_factory: Factory,
) -> None:
    b = broker_factory(tls=True)
    assert b.tls_files is not None and b.tls_port is not None
    sub = subscriber_factory(f"{BASE}/result", broker=b, use_tls=True)
    pub = publisher_factory(b, port=b.tls_port, tls=TlsConfig(ca_file=b.tls_files.ca))
    pub.publish_result(make_result(7))
    assert pub.flush(10)
    [msg] = sub.wait_count(f"{BASE}/result", 1)
    assert msg.json()["message_id"] == make_result(7).message_id

    # Without our CA the broker's certificate is not trusted: no connection, the row waits.
    untrusted = publisher_factory(b, port=b.tls_port, tls=TlsConfig())
    untrusted.publish_result(make_result(8))
    time.sleep(1.0)
    assert not untrusted.connected and untrusted.outbox.depth() == 2


def test_mutual_tls(broker_factory: Callable[..., Broker], publisher_factory: Factory) -> None:
    b = broker_factory(tls=True, require_client_cert=True)
    assert b.tls_files is not None and b.tls_port is not None
    files = b.tls_files
    pub = publisher_factory(
        b,
        port=b.tls_port,
        tls=TlsConfig(ca_file=files.ca, cert_file=files.client_cert, key_file=files.client_key),
    )
    pub.publish_result(make_result(1))
    assert pub.flush(10)
    no_cert = publisher_factory(b, port=b.tls_port, tls=TlsConfig(ca_file=files.ca))
    time.sleep(1.0)
    assert not no_cert.connected


def test_acknowledgements_from_a_display_land_in_the_journal(
    broker: Broker, publisher_factory: Factory, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    result = make_result(5, triage="urgent")
    journal.record_result(result)
    pub = publisher_factory(broker, on_ack=journal.record_ack)
    assert wait_until(lambda: pub.connected)
    pub.publish_result(result)
    assert pub.flush(10)

    display = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="display-a", protocol=mqtt.MQTTv311)
    display.connect(broker.host, broker.port)
    display.loop_start()
    ack = Acknowledgement(
        message_id=result.message_id, by="RN Smith", at="2024-03-01T08:10:00Z", display="icu-1"
    )
    other = Acknowledgement(message_id=result.message_id, by="Dr Jones", at="2024-03-01T08:11:00Z")
    # The old shared-account shapes (ack, ack/<id>): no display account may write them now, so ignored.
    old = Acknowledgement(message_id=result.message_id, by="Old Shape", at="2024-03-01T08:09:00Z")
    mine = f"{BASE}/ack/{result.message_id}"
    sends: list[tuple[str, str | bytes, bool]] = [
        (f"{mine}/display-a", b"{not json", False),
        (f"{mine}/display-a", json.dumps({"message_id": "x"}).encode(), False),  # misses by/at
        (f"{BASE}/ack/someone-else/display-a", ack.model_dump_json(by_alias=True), False),  # topic != payload
        (f"{BASE}/ack", old.model_dump_json(by_alias=True), False),
        (mine, old.model_dump_json(by_alias=True), True),
        (f"{mine}/display-a/extra", old.model_dump_json(by_alias=True), True),
        (f"{mine}/display-a", ack.model_dump_json(by_alias=True), True),  # what the display does
        (f"{mine}/display-b", other.model_dump_json(by_alias=True), False),
    ]
    try:
        for topic, payload, retain in sends:
            display.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        display.disconnect()
        display.loop_stop()
    assert wait_until(lambda: len(journal.acknowledgements(result.message_id)) == 2)
    stored = journal.acknowledgements(result.message_id)
    assert [(a["by"], a["display"]) for a in stored] == [("RN Smith", "icu-1"), ("Dr Jones", None)]
    assert journal.history(limit=1)[0]["acknowledged"] is True

    # After a restart the retained ack is delivered again: stored once.
    pub.close(timeout=1)
    again = publisher_factory(broker, outbox=pub.outbox, on_ack=journal.record_ack)
    assert wait_until(lambda: again.connected)
    time.sleep(0.5)
    assert len(journal.acknowledgements(result.message_id)) == 2


def test_publish_latency_to_puback(broker: Broker, publisher_factory: Factory) -> None:
    """Put -> on disk -> sent -> PUBACK -> row marked acked, one message at a time, on loopback."""
    pub = publisher_factory(broker)
    assert wait_until(lambda: pub.connected)
    latencies = []
    for n in range(200):
        r = make_result(n)
        start = time.perf_counter()
        pub.outbox.put(f"{BASE}/result", r.to_json(), 1, False, message_id=r.message_id)
        assert pub.flush(5)
        latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    median, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    print(
        f"\npublish latency to PUBACK over {len(latencies)} messages: median {median:.1f} ms, p95 {p95:.1f} ms"
    )
    assert p95 < 1000
