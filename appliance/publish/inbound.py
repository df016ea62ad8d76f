"""What displays write to the cart: acknowledgements and history requests, checked before they are used.

Mosquitto limits sizes per packet only (max_packet_size), not per topic: what displays may write is
limited here, per message class, before it is parsed. Anything invalid is logged and ignored; a
display never gets an answer that says why.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from appliance.publish.topics import Topics
from appliance.result import Acknowledgement, HistoryRequest, parse_ack

log = logging.getLogger(__name__)

# A valid acknowledgement is well under 1 KiB; anything far larger is refused before it is parsed.
MAX_ACK_BYTES = 4096
# A history request is a few ids.
MAX_HISTORY_REQUEST_BYTES = 1024


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"


def read_ack(topics: Topics, msg: mqtt.MQTTMessage) -> Acknowledgement | None:
    """The acknowledgement on an ack topic, or None when there is none to store."""
    if not mqtt.topic_matches_sub(topics.ack_filter, msg.topic) or not msg.payload:
        return None  # an empty payload clears a retained ack: nothing to store
    if len(msg.payload) > MAX_ACK_BYTES:
        log.warning("ignored an acknowledgement on %s: %d bytes", msg.topic, len(msg.payload))
        return None
    try:
        ack = parse_ack(msg.payload)  # ack/v1 (older displays) or ack/v2
    except ValidationError as exc:
        log.warning("ignored an invalid acknowledgement on %s: %s", msg.topic, _first_error(exc))
        return None
    # Only ack/<message_id>/<display account>: the ACL lets each display account write there and
    # nowhere else, so the topic (unlike the payload) says which account sent it. The older
    # ack and ack/<message_id> are writable by no display account any more: ignored.
    levels = msg.topic[len(topics.ack) + 1 :].split("/")
    if len(levels) != 2 or not levels[1]:
        log.warning("ignored an acknowledgement on %s: not ack/<message_id>/<display account>", msg.topic)
        return None
    if levels[0] != ack.message_id:
        log.warning("ignored an acknowledgement on %s: it names message %s", msg.topic, ack.message_id)
        return None
    log.info("acknowledgement of %s by %s (account %s)", ack.message_id, ack.by, levels[1])
    return ack


def read_history_request(msg: mqtt.MQTTMessage) -> HistoryRequest | None:
    """A display's question about one patient, or None when it is empty or invalid."""
    if not msg.payload:
        return None
    if len(msg.payload) > MAX_HISTORY_REQUEST_BYTES:
        log.warning("ignored a history request: %d bytes", len(msg.payload))
        return None
    try:
        return HistoryRequest.model_validate_json(msg.payload)
    except ValidationError as exc:
        log.warning("ignored an invalid history request: %s", _first_error(exc))
        return None
