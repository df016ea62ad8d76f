"""The MQTT publisher: outbox rows out to the broker in order, deleted only on the broker's PUBACK.

Threads: paho's network loop (loop_start: connect, reconnect with exponential backoff capped at
reconnect_max_seconds, callbacks) and one drain thread that owns every publish() call. Callbacks
never touch the outbox: on_publish only queues the mid, because paho calls it while holding its
own message lock, and the drain thread maps mids back to outbox rows.

While disconnected nothing is dropped: rows stay in the outbox; rows already handed to paho are
re-sent by paho on reconnect (QoS 1, DUP set). After a restart every pending row is sent again;
subscribers de-duplicate on the payload's message_id.

Topics (see topics.py): `status` retained, with a retained `offline` last will and `online`
re-published on every connect; `result` QoS 1 not retained; `latest/<bed>` retained;
`ack/<message_id>/<display account>` subscribed: acknowledgements from displays, validated
(inbound.py) and handed to `on_ack`.

The drain thread's outbox bookkeeping is sender.py; logging in to the broker is credentials.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance import __version__
from appliance.clock import now_iso
from appliance.config import DeviceConfig, MqttConfig
from appliance.publish.credentials import apply_credentials
from appliance.publish.inbound import read_ack, read_history_request
from appliance.publish.outbox import Outbox
from appliance.publish.sender import OutboxSender
from appliance.publish.topics import Topics
from appliance.result import Acknowledgement, DeviceStatus, History, HistoryRequest, Result, Thumbnail

log = logging.getLogger(__name__)

# Mosquitto's default receive maximum is 20; stay below it and leave room for status messages.
DEFAULT_MAX_INFLIGHT = 16
# The broker keeps our session (and the display acks sent to us) this long while we are away.
SESSION_EXPIRY_SECONDS = 7 * 86400

StatusState = Literal["online", "degraded"]


class MqttPublisher:
    """Publishes results through the durable outbox and keeps the retained status topic current.

    Never blocks the caller on the network: publish_result() returns once the rows are on disk.
    """

    def __init__(
        self,
        config: MqttConfig,
        device: DeviceConfig,
        outbox: Outbox,
        *,
        on_ack: Callable[[Acknowledgement], None] | None = None,
        on_history: Callable[[HistoryRequest], History] | None = None,
        identity: dict[str, str | None] | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
    ) -> None:
        self.config = config
        self.device = device
        self.outbox = outbox
        self.on_ack = on_ack
        self.on_history = on_history
        self.max_inflight = max_inflight
        self.topics = Topics(config.topic_prefix, device.site, device.device_id)
        self.client_id = config.client_id or f"cxr-{device.site}-{device.device_id}"

        self._status = DeviceStatus(
            state="online",
            site=device.site,
            device_id=device.device_id,
            location=device.location,
            since=now_iso(),
            appliance_version=__version__,
            **(identity or {}),
        )
        self._lock = threading.Lock()  # guards _status and _status_dirty
        self._status_dirty = True
        self._status_sent_at = -float("inf")  # monotonic time of the last status sent
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_problem: str | None = None
        self.connects = 0
        self._drain: threading.Thread | None = None
        self.client = self._make_client()
        self._sender = OutboxSender(self.client, outbox, max_inflight, self.client_id)
        outbox.add_listener(self._wake.set)

    # -- set-up --------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        apply_credentials(client, self.config)
        client.will_set(
            self.topics.status, self._status_payload("offline", "connection lost"), qos=1, retain=True
        )
        # paho sleeps in floats; the int hints are narrower than the behaviour.
        high = self.config.reconnect_max_seconds
        client.reconnect_delay_set(min(0.5, high), high)  # type: ignore[arg-type]
        client.max_inflight_messages_set(self.max_inflight + 4)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        # A refused or timed-out TCP connect calls neither of the two above (connect_async).
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> MqttPublisher:
        """Connect in the background (returns at once; a missing broker is retried with backoff)."""
        if not self.config.enabled:
            log.info("mqtt disabled: results stay in the journal only")
            return self
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        self.client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()
        self._drain = threading.Thread(target=self._drain_loop, name="mqtt-drain", daemon=True)
        self._drain.start()
        log.info(
            "mqtt publisher %s -> %s:%d (tls %s, user %s), outbox depth %d",
            self.client_id,
            self.config.host,
            self.config.port,
            "on" if self.config.tls else "off",
            self.config.username or "-",
            self.outbox.depth(),
        )
        return self

    # -- public API ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def acks_received(self) -> int:
        """PUBACKs for outbox rows so far (status messages not counted)."""
        return self._sender.acks_received

    def publish_result(self, result: Result) -> bool:
        """Put the result on `result` and `latest/<bed>` (one transaction). False if already queued/sent."""
        if not self.config.enabled:
            return False
        if not self.config.publish_heatmap and result.heatmap is not None:
            result = result.model_copy(update={"heatmap": None})
        payload = result.to_json()
        qos = self.config.qos
        added = self.outbox.put_many(
            [
                (self.topics.result, payload, qos, False, result.message_id),
                (self.topics.latest(result.location), payload, qos, True, result.message_id),
            ]
        )
        return added > 0

    def publish_thumbnail(self, result: Result, thumbnail: Thumbnail | None) -> bool:
        """Retained on `thumbnail/<bed>` through the outbox. None clears the bed's picture: the one there
        belongs to an earlier image. False if already queued/sent, or thumbnails are off."""
        if not self.config.enabled or not self.config.publish_thumbnail:
            return False
        payload = thumbnail.model_dump_json(by_alias=True) if thumbnail is not None else ""
        topic = self.topics.thumbnail(result.location)
        return self.outbox.put(topic, payload, self.config.qos, True, message_id=result.message_id)

    def publish_status(
        self,
        state: StatusState = "online",
        *,
        reason: str | None = None,
        accepting: bool = True,
        queue_depth: int | None = None,
        **fields: Any,
    ) -> None:
        """Change the retained status (e.g. degraded: disk full, not accepting). Sent now or on reconnect."""
        with self._lock:
            update: dict[str, Any] = {"state": state, "reason": reason, "accepting": accepting, **fields}
            if queue_depth is not None:
                update["queue_depth"] = queue_depth
            changed = any(getattr(self._status, k) != v for k, v in update.items())
            if (state, accepting) != (self._status.state, self._status.accepting):
                update["since"] = now_iso()
            self._status = DeviceStatus.model_validate({**self._status.model_dump(), **update})
            self._status_dirty = self._status_dirty or changed
        self._wake.set()

    @property
    def status(self) -> DeviceStatus:
        with self._lock:
            return self._status.model_copy(update={"outbox_depth": self.outbox.depth()})

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the broker acknowledged everything in the outbox (for a clean shutdown)."""
        return self.outbox.wait_empty(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Publish a retained `offline` (a clean disconnect sends no last will), then disconnect.

        Rows not yet acknowledged stay in the outbox for the next start."""
        self._stop.set()
        self._wake.set()
        if self._drain is not None:
            self._drain.join(timeout)
        if self.config.enabled and self.connected:
            info = self.client.publish(
                self.topics.status, self._status_payload("offline", "shutdown"), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("offline status not confirmed before shutdown")
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread; must not block) ---------------------------------------
    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: Any, reason: mqtt.ReasonCode, _p: Properties | None
    ) -> None:
        if reason.is_failure:
            self._problem(f"broker {self.config.host}:{self.config.port} refused the connection: {reason}")
            return
        self.connects += 1
        self._last_problem = None
        log.info("mqtt connected to %s:%d (session present: %s)", self.config.host, self.config.port,
                 flags.session_present)  # fmt: skip
        client.subscribe(self.topics.ack_filter, qos=1)
        if self.on_history is not None:
            client.subscribe(self.topics.history_request, qos=1)
        with self._lock:
            self._status_dirty = True  # `online` on EVERY (re)connect, replacing the last will
        self._connected.set()
        self._wake.set()

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        if not self._stop.is_set():
            # One line per outage (the text does not change between attempts): results wait in the outbox.
            self._problem(f"broker {self.config.host}:{self.config.port} not reachable; retrying")

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: mqtt.ReasonCode, _p: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            self._problem(
                f"mqtt connection lost ({reason}); {self.outbox.depth()} message(s) wait in the outbox"
            )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: mqtt.ReasonCode, _p: Any) -> None:
        self._sender.acks.put((mid, reason))
        self._wake.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.history_request:
            self._answer_history(msg)
            return
        ack = read_ack(self.topics, msg)
        if ack is not None and self.on_ack is not None:
            try:
                self.on_ack(ack)
            except Exception:
                log.exception("storing acknowledgement %s failed", ack.message_id)

    def _answer_history(self, msg: mqtt.MQTTMessage) -> None:
        """A display's question about one patient: answered at once, not retained, not via the outbox
        (a lost answer is asked again when the display reconnects)."""
        if self.on_history is None:
            return
        request = read_history_request(msg)
        if request is None:
            return
        try:
            history = self.on_history(request)
        except Exception:
            log.exception("history request %s failed", request.request_id)
            return
        self.client.publish(self.topics.history, history.model_dump_json(by_alias=True), qos=1, retain=False)

    def _problem(self, text: str) -> None:
        # One line per distinct problem, not one per reconnect attempt.
        if text != self._last_problem:
            log.warning("%s", text)
            self._last_problem = text

    # -- drain thread --------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._sender.handle_acks()
                if self.connected:
                    self._send_status_if_dirty()
                    self._sender.send_pending(self.connects)
            except Exception:
                # A bug or a disk error must not kill the sender silently; retry after a pause.
                log.exception("mqtt drain step failed; retrying")
                time.sleep(1.0)
        self._sender.handle_acks()

    def _send_status_if_dirty(self) -> None:
        """A changed status at once, an unchanged one every heartbeat (the displays' proof of life)."""
        now = time.monotonic()
        with self._lock:
            due = now - self._status_sent_at >= self.config.heartbeat_seconds
            if not (self._status_dirty or due):
                return
            self._status_dirty = False
            self._status_sent_at = now
        heartbeat = {"heartbeat_at": now_iso(), "heartbeat_seconds": self.config.heartbeat_seconds}
        payload = self.status.model_copy(update=heartbeat).model_dump_json(by_alias=True)
        self.client.publish(self.topics.status, payload, qos=1, retain=True)

    def _status_payload(self, state: Literal["online", "offline", "degraded"], reason: str | None) -> str:
        with self._lock:
            status = self._status.model_copy(update={"state": state, "reason": reason, "since": now_iso()})
        return status.model_dump_json(by_alias=True)
