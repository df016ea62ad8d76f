"""Metrics read when Prometheus scrapes, on the HTTP thread: spool backlog, outbox depth and age,
disk free space, temperatures and clocks. Labels only take values from small fixed sets (the sensors'
own names), never file names or patient data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:  # type hints only: the daemon hands these in
    from appliance.ingest.spool import Spool
    from appliance.publish.mqtt import MqttPublisher

log = logging.getLogger(__name__)

THERMAL_ROOT = Path("/sys/class/thermal")
# Jetson GPU (and on some modules NVDLA/EMC) clocks: the kernel's devfreq devices, cur_freq in Hz.
DEVFREQ_ROOT = Path("/sys/class/devfreq")


class ScrapeSources(Protocol):
    """What a scrape reads (the daemon's Metrics): spool and publisher are None until it starts."""

    spool: Spool | None
    publisher: MqttPublisher | None
    thermal_root: Path
    devfreq_root: Path


class StateCollector:
    """Values read at scrape time, on the HTTP thread: the spool, the outbox, the disk, the sensors.

    Spool and outbox are thread-safe; while the daemon closes them (shutdown) a scrape may find a
    closed database, and then that metric is left out of this one scrape."""

    def __init__(self, metrics: ScrapeSources) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        spool, publisher = self.metrics.spool, self.metrics.publisher
        if spool is not None:
            with _skip_closed():
                backlog = spool.pending_count()
                yield GaugeMetricFamily(
                    "cxr_spool_backlog_images",
                    "Images accepted and not yet finished (waiting in incoming/ or in processing/).",
                    value=backlog,
                )
            with _skip_closed():
                st = os.statvfs(spool.root)
                yield GaugeMetricFamily(
                    "cxr_spool_filesystem_free_bytes",
                    "Free space on the spool's filesystem (available to the daemon's user).",
                    value=st.f_bavail * st.f_frsize,
                )
            yield GaugeMetricFamily(
                "cxr_spool_filesystem_reserve_bytes",
                "ingest.min_free_mb: below this much free space the cart stops accepting images.",
                value=spool.min_free_mb * 1e6,  # the spool's own rule counts MB as 10^6 bytes
            )
        if publisher is not None:
            outbox = publisher.outbox
            with _skip_closed():
                depth, age, dropped = outbox.depth(), outbox.oldest_pending_age(), outbox.dropped
                yield GaugeMetricFamily(
                    "cxr_outbox_depth_messages",
                    "MQTT messages stored and not yet acknowledged by the broker.",
                    value=depth,
                )
                yield GaugeMetricFamily(
                    "cxr_outbox_oldest_pending_age_seconds",
                    "How long the oldest unacknowledged MQTT message has waited (0: none waits).",
                    value=age,
                )
                yield CounterMetricFamily(
                    "cxr_outbox_dropped",
                    "MQTT messages dropped because the outbox reached mqtt.outbox_max (kept across restarts).",
                    value=dropped,
                )
            yield GaugeMetricFamily(
                "cxr_mqtt_connected",
                "1 while connected to the broker, else 0.",
                value=int(publisher.connected),
            )
        for family in (self._temperatures(), self._clocks()):
            if family.samples:  # absent, not zero, where the machine has no such sensor
                yield family

    def _clocks(self) -> GaugeMetricFamily:
        """/sys/class/devfreq (a Jetson's GPU clock, throttled when hot); unreadable devices are skipped."""
        family = GaugeMetricFamily(
            "cxr_devfreq_clock_hertz",
            "Current clock of each readable devfreq device (on a Jetson: the GPU).",
            labels=["device"],
        )
        with contextlib.suppress(OSError):
            for device in sorted(self.metrics.devfreq_root.iterdir()):
                try:
                    hertz = int((device / "cur_freq").read_text().strip())
                except (OSError, ValueError):
                    continue
                family.add_metric([device.name], float(hertz))
        return family

    def _temperatures(self) -> GaugeMetricFamily:
        """/sys/class/thermal (a Jetson's CPU/GPU/SoC sensors); zones that cannot be read are skipped."""
        family = GaugeMetricFamily(
            "cxr_thermal_zone_temperature_celsius",
            "Temperature of each readable thermal zone (on a Jetson: CPU, GPU, SoC).",
            labels=["zone", "type"],
        )
        with contextlib.suppress(OSError):
            for zone in sorted(self.metrics.thermal_root.glob("thermal_zone*")):
                try:
                    millidegrees = int((zone / "temp").read_text().strip())
                    kind = (zone / "type").read_text().strip()
                except (OSError, ValueError):
                    continue  # a sensor that is off or asleep answers EIO/ENODATA: not an error of ours
                family.add_metric([zone.name, kind], millidegrees / 1000.0)
        return family


@contextlib.contextmanager
def _skip_closed() -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        log.debug("metrics: value left out of this scrape: %s", exc)
