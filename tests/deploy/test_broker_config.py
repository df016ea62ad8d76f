"""A REAL Mosquitto running the shipped configuration (systemd/mosquitto/cxr.conf) as install.sh sets it up.

Only the listener ports and file paths are rewritten (to free loopback ports and a temporary root);
the main file mirrors Debian's /etc/mosquitto/mosquitto.conf, which includes conf.d.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from testsupport.mosquitto import MOSQUITTO, Subscriber, free_port

REPO = Path(__file__).resolve().parents[2]
SITE, DEVICE = "ward7", "cart-3"
KIOSK = "display-kiosk"  # the cart's own screen: the display account install.sh creates
LOOPBACK = "127.0.0.1"
SHIPPED_PORTS = {"8883": "tls_port", "9001": "ws_port", "9443": "wss_port"}


@dataclass
class ShippedBroker:
    """The installed tree plus one mosquitto process; quacks like testsupport.mosquitto.Broker."""

    root: Path
    host: str = LOOPBACK
    tls_port: int = field(default_factory=free_port)
    ws_port: int = field(default_factory=free_port)
    wss_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        subprocess.run(
            ["bash", str(REPO / "tools/install.sh"), "--root", str(self.root), "--no-systemctl", "--skip-venv",
             "--skip-doctor", "--python", sys.executable, "--site", SITE, "--device-id", DEVICE],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        dropin = self.root / "etc/mosquitto/conf.d/cxr.conf"
        text = dropin.read_text()
        for shipped, attr in SHIPPED_PORTS.items():
            text, n = re.subn(rf"^listener {shipped}\b", f"listener {getattr(self, attr)}", text, flags=re.M)
            assert n == 1, f"shipped config has no 'listener {shipped}'"
        dropin.write_text(text)
        self.main_conf = self.root / "etc/mosquitto/mosquitto.conf"
        self.main_conf.write_text(
            # Debian's main file, with our folders; as root mosquitto would switch to user "mosquitto".
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"persistence true\npersistence_location {self.root}/var/lib/mosquitto/\n"
            f"log_dest file {self.root}/mosquitto.log\nlog_type all\n"
            f"include_dir {self.root}/etc/mosquitto/conf.d\n"
        )
        (self.root / "var/lib/mosquitto").mkdir(parents=True, exist_ok=True)

    @property
    def port(self) -> int:  # what Subscriber uses without TLS: the TLS port, so plain text must fail
        return self.tls_port

    def secret(self, account: str) -> str:
        name = "cart" if account == DEVICE else account
        return (self.root / f"etc/cxr-appliance/secrets/mqtt-{name}.password").read_text().strip()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.root / "etc/cxr-appliance/ca.crt"))

    def start(self) -> ShippedBroker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.main_conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        for port in (self.tls_port, self.ws_port, self.wss_port):
            while True:
                assert self.proc.poll() is None, (
                    f"mosquitto exited: {self.proc.stderr and self.proc.stderr.read()!r}"
                )
                try:
                    socket.create_connection((LOOPBACK, port), timeout=0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"mosquitto not listening on {port}"
                    time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: the persistence file is written
            self.proc.wait(15)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedBroker]:
    b = ShippedBroker(tmp_path_factory.mktemp("shipped")).start()
    yield b
    b.stop()


class Client:
    """A paho client that records its CONNACK; `publish` waits for the broker's PUBACK."""

    def __init__(
        self,
        broker: ShippedBroker,
        user: str | None,
        password: str | None = None,
        *,
        tls: bool = True,
        transport: Literal["tcp", "websockets"] = "tcp",
        port: int | None = None,
    ) -> None:
        self.done = threading.Event()
        self.reason: Any = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{time.monotonic_ns()}", transport=transport
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set_context(broker.ssl_context())
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(5, 5)
        self.client.connect_async(broker.host, port or broker.tls_port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self.done.set()

    def accepted(self, timeout: float = 5.0) -> bool:
        return self.done.wait(timeout) and not self.reason.is_failure

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def denied(broker: ShippedBroker) -> str:
    """The broker's "Denied PUBLISH" log lines (log_type all), each naming the topic in quotes."""
    log = (broker.root / "mosquitto.log").read_text(errors="replace")
    return "\n".join(line for line in log.splitlines() if "Denied PUBLISH" in line)


def subscriber(broker: ShippedBroker, account: str, topic: str) -> Subscriber:
    return Subscriber(
        broker,  # type: ignore[arg-type]
        topic,
        username=account,
        password=broker.secret(account),
        use_tls=True,
        clean_session=True,
    )


def test_tls_client_with_the_right_password_connects(broker: ShippedBroker) -> None:
    c = Client(broker, DEVICE, broker.secret(DEVICE))
    try:
        assert c.accepted(), c.reason
    finally:
        c.close()


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), (DEVICE, "wrong-password"), (KIOSK, "wrong-password"), ("display", "x"), ("nobody", "x")],
)
def test_anonymous_and_wrong_passwords_are_refused(
    broker: ShippedBroker, user: str | None, password: str
) -> None:
    c = Client(broker, user, password)
    try:
        assert c.done.wait(5), "no CONNACK"
        assert c.reason.is_failure
        assert "authori" in str(c.reason).lower()
    finally:
        c.close()


def test_plain_text_mqtt_gets_no_session(broker: ShippedBroker) -> None:
    c = Client(broker, DEVICE, broker.secret(DEVICE), tls=False)
    try:
        assert not c.accepted(timeout=3)
    finally:
        c.close()


def test_display_reads_results_but_cannot_publish_one(broker: ShippedBroker) -> None:
    base = f"cxr/{SITE}/{DEVICE}"
    with (
        subscriber(broker, KIOSK, "cxr/#") as display_view,
        subscriber(broker, DEVICE, f"{base}/#") as cart_view,
    ):
        cart = Client(broker, DEVICE, broker.secret(DEVICE))
        display = Client(broker, KIOSK, broker.secret(KIOSK))
        try:
            assert cart.accepted() and display.accepted()
            cart.publish(f"{base}/result", '{"from": "cart"}')
            assert display_view.wait_count(f"{base}/result", 1)
            # A forged result, then an acknowledgement: the ack arriving proves the result was dropped.
            display.publish(f"{base}/result", '{"from": "display"}')
            display.publish(f"{base}/ack/m1/{KIOSK}", '{"message_id": "m1"}', retain=True)
            assert cart_view.wait_count(f"{base}/ack/m1/{KIOSK}", 1)
            results = [m.payload for m in cart_view.on_topic(f"{base}/result")]
            assert results == [b'{"from": "cart"}']
            display.publish(f"{base}/ack/m1/{KIOSK}", "", retain=True)  # clear it for the other tests
        finally:
            cart.close()
            display.close()


def test_cart_publishes_only_under_its_own_prefix(broker: ShippedBroker) -> None:
    with subscriber(broker, DEVICE, "cxr/#") as view:
        cart = Client(broker, DEVICE, broker.secret(DEVICE))
        try:
            assert cart.accepted()
            cart.publish(f"cxr/{SITE}/cart-9/result", "forged")
            cart.publish(f"cxr/other-site/{DEVICE}/result", "forged")
            cart.publish("elsewhere/x", "forged")
            cart.publish(f"cxr/{SITE}/{DEVICE}/status", "mine")
            assert view.wait_count(f"cxr/{SITE}/{DEVICE}/status", 1)
            assert [m.payload for m in view.messages if not m.retain] == [b"mine"]
            # No account reads everything any more: the broker's log shows each forgery refused.
            for topic in (f"cxr/{SITE}/cart-9/result", f"cxr/other-site/{DEVICE}/result", "elsewhere/x"):
                assert f"'{topic}'" in denied(broker), topic
        finally:
            cart.close()


def check_websockets(broker: ShippedBroker, port: int, tls: bool) -> None:
    anonymous = Client(broker, None, tls=tls, transport="websockets", port=port)
    ws = Client(broker, KIOSK, broker.secret(KIOSK), tls=tls, transport="websockets", port=port)
    got, subscribed = threading.Event(), threading.Event()
    ws.client.on_message = lambda _c, _u, msg: got.set()
    ws.client.on_subscribe = lambda *_a: subscribed.set()
    try:
        assert anonymous.done.wait(5) and anonymous.reason.is_failure
        assert ws.accepted(), ws.reason
        ws.client.subscribe(f"cxr/{SITE}/+/result", qos=1)
        assert subscribed.wait(5)
        cart = Client(broker, DEVICE, broker.secret(DEVICE))
        assert cart.accepted()
        cart.publish(f"cxr/{SITE}/{DEVICE}/result", "r")
        cart.close()
        assert got.wait(5), f"no result over {'wss' if tls else 'ws'}"
    finally:
        anonymous.close()
        ws.close()


def test_display_over_plain_websockets_on_loopback(broker: ShippedBroker) -> None:
    """The cart's own screen: ws://127.0.0.1:9001, its display account only."""
    check_websockets(broker, broker.ws_port, tls=False)


def test_display_over_websockets_with_tls(broker: ShippedBroker) -> None:
    """Ward monitors elsewhere: wss:// verified with the generated CA."""
    check_websockets(broker, broker.wss_port, tls=True)


def test_plain_websockets_listen_on_loopback_only() -> None:
    text = (REPO / "systemd/mosquitto/cxr.conf").read_text()
    blocks = re.split(r"^(?=listener )", text, flags=re.M)
    plain_ws = [b for b in blocks if "protocol websockets" in b and "certfile" not in b]
    assert plain_ws and all(b.startswith("listener 9001 127.0.0.1\n") for b in plain_ws)
    plain_mqtt = [
        b for b in blocks if b.startswith("listener") and "websockets" not in b and "certfile" not in b
    ]
    assert plain_mqtt == []


def test_retained_status_survives_a_broker_restart(tmp_path: Path) -> None:
    b = ShippedBroker(tmp_path).start()
    try:
        cart = Client(b, DEVICE, b.secret(DEVICE))
        assert cart.accepted()
        cart.publish(f"cxr/{SITE}/{DEVICE}/status", "online", retain=True)
        cart.close()
        b.stop()
        b.start()
        with subscriber(b, KIOSK, f"cxr/{SITE}/+/status") as view:
            assert view.wait_count(f"cxr/{SITE}/{DEVICE}/status", 1)
            assert view.messages[0].retain and view.messages[0].payload == b"online"
    finally:
        b.stop()


def accounts(broker: ShippedBroker, *args: str) -> str:
    """`cxr-appliance display-account ...` on the installed files, the broker told to re-read them."""
    mosq = broker.root / "etc/mosquitto"
    assert broker.proc is not None
    files = ["--passwd", str(mosq / "cxr.passwd"), "--acl", str(mosq / "cxr.acl")]
    if args[0] != "list":
        files += ["--reload-pid", str(broker.proc.pid)]
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "display-account", *args, *files],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_display_reads_only_its_site_and_acks_only_as_itself(broker: ShippedBroker) -> None:
    """Per-display accounts from the CLI, in the shipped broker with the generated password file and ACL."""
    out = accounts(broker, "add", "icu", "--site", SITE, "--password-file", str(broker.root / "icu.pw"))
    assert "SIGHUP" in out
    accounts(broker, "add", "ward9", "--site", "ward9", "--password-file", str(broker.root / "ward9.pw"))
    icu_pw = (broker.root / "icu.pw").read_text().strip()
    assert icu_pw not in out and len(icu_pw) >= 24
    # Mosquitto re-reads the files asynchronously after SIGHUP: wait until the new account logs in.
    icu = Client(broker, "display-icu", icu_pw)
    assert icu.accepted(timeout=10), icu.reason
    mine, theirs = f"cxr/{SITE}/{DEVICE}", f"cxr/ward9/{DEVICE}"
    with (
        subscriber(broker, KIOSK, "cxr/#") as kiosk_view,
        Subscriber(broker, "cxr/#", username="display-ward9",  # type: ignore[arg-type]
                   password=(broker.root / "ward9.pw").read_text().strip(), use_tls=True) as ward9_view,
    ):  # fmt: skip
        cart = Client(broker, DEVICE, broker.secret(DEVICE))
        kiosk = Client(broker, KIOSK, broker.secret(KIOSK))
        try:
            assert cart.accepted() and kiosk.accepted()
            cart.publish(f"{mine}/result", "r")
            icu.publish(f"{mine}/ack/m1/display-icu", "icu's ack", retain=True)
            assert kiosk_view.wait_count(f"{mine}/ack/m1/display-icu", 1)
            # The kiosk tries to overwrite and to clear the icu display's ack, to write the old shared
            # shapes, and to ack on another site; then writes its own ack, which arrives after all of them.
            for topic, payload in [
                (f"{mine}/ack/m1/display-icu", "forged"),
                (f"{mine}/ack/m1/display-icu", ""),
                (f"{mine}/ack/m1", "old shape"),
                (f"{mine}/ack", "old shape"),
                (f"{theirs}/ack/m1/{KIOSK}", "other site"),
                (f"{mine}/result", "forged result"),
            ]:
                kiosk.publish(topic, payload, retain=True)
            kiosk.publish(f"{mine}/ack/m1/{KIOSK}", "kiosk's ack", retain=True)
            assert kiosk_view.wait_count(f"{mine}/ack/m1/{KIOSK}", 1)
            got = [(m.topic, m.payload) for m in kiosk_view.messages]
            assert got == [
                (f"{mine}/result", b"r"),
                (f"{mine}/ack/m1/display-icu", b"icu's ack"),
                (f"{mine}/ack/m1/{KIOSK}", b"kiosk's ack"),
            ]
            assert ward9_view.messages == []  # it saw nothing of ward7, and nothing reached ward9
            assert f"'{theirs}/ack/m1/{KIOSK}'" in denied(broker)
            # What a display loading now gets: both acks, each untouched.
            with subscriber(broker, KIOSK, f"{mine}/ack/#") as late:
                assert late.wait_count(f"{mine}/ack/#", 2)
                time.sleep(0.3)
                assert sorted((m.topic, m.payload) for m in late.messages) == [
                    (f"{mine}/ack/m1/display-icu", b"icu's ack"),
                    (f"{mine}/ack/m1/{KIOSK}", b"kiosk's ack"),
                ]
            for c, topic in ((icu, f"{mine}/ack/m1/display-icu"), (kiosk, f"{mine}/ack/m1/{KIOSK}")):
                c.publish(topic, "", retain=True)  # clean up for the other tests
        finally:
            for c in (cart, kiosk, icu):
                c.close()
    assert "display-ward9  site ward9" in accounts(broker, "list")
    accounts(broker, "revoke", "icu")
    accounts(broker, "revoke", "ward9")


def test_a_revoked_display_can_no_longer_log_in(broker: ShippedBroker) -> None:
    accounts(broker, "add", "lobby", "--site", SITE, "--password-file", str(broker.root / "lobby.pw"))
    password = (broker.root / "lobby.pw").read_text().strip()
    before = Client(broker, "display-lobby", password)
    try:
        assert before.accepted(timeout=10), before.reason
    finally:
        before.close()
    out = accounts(broker, "revoke", "lobby")
    assert "revoked broker account display-lobby" in out and "SIGHUP" in out
    assert "display-lobby" not in (broker.root / "etc/mosquitto/cxr.passwd").read_text()
    assert "display-lobby" not in (broker.root / "etc/mosquitto/cxr.acl").read_text()
    deadline = time.monotonic() + 10
    while True:  # the reload is asynchronous: the refusal comes within moments
        after = Client(broker, "display-lobby", password)
        try:
            assert after.done.wait(5), "no CONNACK"
            if after.reason.is_failure:
                break
        finally:
            after.close()
        assert time.monotonic() < deadline, "display-lobby still logs in after revoke + SIGHUP"
        time.sleep(0.2)
    assert "not authori" in str(after.reason).lower()


def test_a_1_mb_retained_ack_is_refused_by_the_broker(broker: ShippedBroker) -> None:
    """max_packet_size: the broker drops the packet (and the client); nothing is retained or delivered."""
    topic = f"cxr/{SITE}/{DEVICE}/ack/m-big/{KIOSK}"
    with subscriber(broker, DEVICE, f"cxr/{SITE}/{DEVICE}/ack/#") as cart_view:
        kiosk = Client(broker, KIOSK, broker.secret(KIOSK))
        try:
            assert kiosk.accepted()
            lost = threading.Event()
            kiosk.client.on_disconnect = lambda *_a: lost.set()
            info = kiosk.client.publish(topic, "x" * 1_000_000, qos=1, retain=True)
            # Either paho refuses it against the CONNACK's maximum packet size, or the broker cuts the client.
            assert info.rc != mqtt.MQTT_ERR_SUCCESS or lost.wait(10)
        finally:
            kiosk.close()
        # A small ack afterwards still works and is the only one the cart ever sees.
        again = Client(broker, KIOSK, broker.secret(KIOSK))
        try:
            assert again.accepted()
            again.publish(f"cxr/{SITE}/{DEVICE}/ack/m-small/{KIOSK}", "ok")
            assert cart_view.wait_count(f"cxr/{SITE}/{DEVICE}/ack/m-small/{KIOSK}", 1)
        finally:
            again.close()
        assert cart_view.on_topic(topic) == []
