"""Publish stage: results to the MQTT broker through a durable outbox. See mqtt.py and outbox.py."""

from appliance.publish.mqtt import MqttPublisher
from appliance.publish.outbox import Outbox, OutboxRow
from appliance.publish.topics import Topics, topic_level

__all__ = ["MqttPublisher", "Outbox", "OutboxRow", "Topics", "topic_level"]
