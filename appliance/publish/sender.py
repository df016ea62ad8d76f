"""Outbox rows handed to paho in order, at most `max_inflight` at a time, and marked acknowledged
(or rejected) when the broker answers. Used by the publisher's drain thread only: none of this is
locked, and paho's callbacks reach it only through the `acks` queue.
"""

from __future__ import annotations

import logging
import queue

import paho.mqtt.client as mqtt

from appliance.publish.outbox import Outbox

log = logging.getLogger(__name__)


class OutboxSender:
    def __init__(self, client: mqtt.Client, outbox: Outbox, max_inflight: int, client_id: str) -> None:
        self.client = client
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.client_id = client_id
        # Filled by on_publish on paho's network thread, which holds paho's message lock meanwhile.
        self.acks: queue.SimpleQueue[tuple[int, mqtt.ReasonCode | None]] = queue.SimpleQueue()
        self.acks_received = 0
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._last_handed = 0  # highest outbox row id handed to paho
        self._unconfirmed_qos0: dict[int, int] = {}  # QoS 0 handed to paho, not yet written
        self._connects_seen = 0  # the connect count at the last send_pending(); a change = reconnected

    def handle_acks(self) -> None:
        acked: list[int] = []
        rejected: list[tuple[int, str]] = []
        while True:
            try:
                mid, reason = self.acks.get_nowait()
            except queue.Empty:
                break
            row_id = self._inflight.pop(mid, None)
            self._unconfirmed_qos0.pop(mid, None)
            if row_id is None:
                continue  # a status message
            self.acks_received += 1
            if reason is not None and reason.is_failure:
                rejected.append((row_id, str(reason)))
            else:
                acked.append(row_id)
        self.outbox.mark_acked(acked)
        for row_id, why in rejected:
            self.outbox.mark_rejected([row_id], f"PUBACK {why} (check the broker's ACL for {self.client_id})")

    def send_pending(self, connects: int) -> None:
        """Hand over what fits in the window; `connects` counts the client's connections so far."""
        if self._connects_seen != connects:
            self._connects_seen = connects
            self._resend_lost_qos0()
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        handed = set(self._inflight.values())
        for row in self.outbox.pending(after_id=self._last_handed, limit=room + len(handed)):
            if row.id in handed:
                continue  # still in flight at QoS 1/2 (a rewind for lost QoS 0 rows passed over it)
            if len(self._inflight) >= self.max_inflight:
                return
            info = self.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Not queued by paho (e.g. queue full): try again from this row next time.
                log.warning("mqtt publish of %s deferred: %s", row.message_id, mqtt.error_string(info.rc))
                return
            if row.qos == 0 and info.rc == mqtt.MQTT_ERR_NO_CONN:
                return  # paho drops a QoS 0 message it cannot write: it stays in the outbox for later
            # NO_CONN at QoS 1/2: paho keeps the message and sends it after reconnecting. QoS 0 is
            # marked sent only when paho reports it written to the socket (on_publish), never before.
            self._inflight[info.mid] = row.id
            if row.qos == 0:
                self._unconfirmed_qos0[info.mid] = row.id
            self._last_handed = row.id

    def _resend_lost_qos0(self) -> None:
        """After a reconnect: QoS 0 messages paho had not written when the connection dropped are gone
        from its queue (it keeps only QoS 1/2 for the session); hand them over again."""
        if not self._unconfirmed_qos0:
            return
        for mid in self._unconfirmed_qos0:
            self._inflight.pop(mid, None)
        self._last_handed = min(self._unconfirmed_qos0.values()) - 1
        self._unconfirmed_qos0.clear()
