"""The shared Mosquitto fixture itself: real broker, restarts on the same port, queues for a persistent session."""

from __future__ import annotations

import socket
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from testsupport.mosquitto import Broker, Subscriber


def _publish(broker: Broker, topic: str, payload: bytes) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(topic, payload, qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_restart_same_port_keeps_queued_messages(broker: Broker) -> None:
    sub = Subscriber(broker, "t/#", client_id="fixture-sub")
    _publish(broker, "t/a", b"1")
    assert sub.wait_count("t/#", 1, 5)
    sub.close()
    _publish(broker, "t/a", b"2")  # queued for the offline persistent session
    port = broker.port
    broker.restart()
    assert broker.port == port
    sub = Subscriber(broker, "t/#", client_id="fixture-sub")
    try:
        got = sub.wait_count("t/#", 1, 5)
        assert [m.payload for m in got] == [b"2"]
    finally:
        sub.close()


def test_kill_closes_the_port(broker: Broker) -> None:
    broker.kill()
    assert not broker.running
    with socket.socket() as s:
        assert s.connect_ex((broker.host, broker.port)) != 0
    broker.start()
    assert broker.running


def test_websockets_and_tls_listeners_open(broker_factory: Callable[..., Broker]) -> None:
    b = broker_factory(websockets=True, tls=True)
    assert b.ws_port and b.tls_port
    for port in (b.ws_port, b.tls_port):
        with socket.create_connection((b.host, port), timeout=2):
            pass
    sub = Subscriber(b, "x", use_tls=True)  # the TLS handshake with the generated CA succeeds
    sub.close()
